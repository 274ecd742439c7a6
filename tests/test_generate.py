"""`slimtune generate`: greedy output equals transformers' generate on the merged model (`export --merge`),
for a LoRA and a QLoRA (NF4) run; the chat-template path; seeded sampling; bad arguments; stdout."""

import json
import shutil

import pytest
import torch

from slimtune.cli import main
from slimtune.trainer.generate import split_args

PROMPT = "The for statement"


def _run(tmp_path_factory, recipe, *extra):
    from slimtune_testutil import TINY

    out = tmp_path_factory.mktemp(recipe) / "run"
    assert main(["run", recipe, *TINY, "train.max_steps=8", "train.lr=2e-2", *extra, f"output_dir={out}"]) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _run(tmp_path_factory, "lora")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    return _run(tmp_path_factory, "qlora")


def _generate(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["generate", *args]) == 0
    return capsys.readouterr().out


def _hf_greedy(model_dir, ids: list[int], n: int, with_ids: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    new = [t for t in out[0, len(ids) :].tolist() if t != tok.eos_token_id]
    text = tok.decode(new, skip_special_tokens=True)
    return (text, new) if with_ids else text


def _slimtune_greedy_ids(name, ids: list[int], n: int) -> list[int]:
    """The token ids behind `slimtune generate` (a tiny random model's text repeats, so compare the ids too)."""
    from slimtune.config import load_config
    from slimtune.formats.hf import load_tokenizer
    from slimtune.trainer.generate import decode, stop_ids
    from slimtune.model.pipeline import build_for_eval

    model = build_for_eval(load_config(None, [f"model.name={name}"]))
    return decode(model, ids, n, 0.0, 1.0, 0, stop_ids(model, load_tokenizer(name)), torch.device("cpu"))


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_greedy_equals_transformers_on_the_merged_model(kind, request, capsys):
    from transformers import AutoTokenizer

    run = request.getfixturevalue(f"{kind}_run")
    onto = ["--onto", "quantized"] if kind == "qlora" else []  # merged into dequant(Q): the trained model
    assert main(["export", str(run), "--merge", *onto]) == 0
    ids = AutoTokenizer.from_pretrained(run / "merged")(PROMPT)["input_ids"]
    want, want_ids = _hf_greedy(run / "merged", ids, 24, with_ids=True)
    got = _generate(capsys, f"model.name={run / 'final'}", f"prompt={PROMPT}", "max_new_tokens=24")
    assert got == want + "\n"  # stdout: the continuation only
    assert _slimtune_greedy_ids(run / "final", ids, 24) == want_ids and len(want_ids) > 0
    assert _generate(capsys, "model.name=tiny-llama", f"prompt={PROMPT}", "max_new_tokens=24") != got  # adapted
    assert _generate(capsys, f"model.name={run}", f"prompt={PROMPT}", "max_new_tokens=24") == got  # a run dir


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_model_dir):
    """tiny-llama with a simple chat template (the built-in one has none)."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_model_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    tok.save_pretrained(d)
    return d


def _template_ids(model_dir, messages) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<s>assistant:")
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_template_prompt_and_messages(chat_model, tmp_path, capsys):
    got = _generate(capsys, f"model.name={chat_model}", f"prompt={PROMPT}", "max_new_tokens=16")
    assert got == _hf_greedy(chat_model, _template_ids(chat_model, [{"role": "user", "content": PROMPT}]), 16) + "\n"
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": PROMPT},
    ]
    f = tmp_path / "conv.json"
    f.write_text(json.dumps(conv))
    got = _generate(capsys, f"model.name={chat_model}", f"messages={f}", "max_new_tokens=16")
    assert got == _hf_greedy(chat_model, _template_ids(chat_model, conv), 16) + "\n"
    from transformers import AutoTokenizer

    template = tmp_path / "chat.jinja"  # data.chat_template=FILE on the template-less model: the same prompt
    template.write_text(AutoTokenizer.from_pretrained(chat_model).chat_template)
    assert (
        _generate(
            capsys, "model.name=tiny-llama", f"data.chat_template={template}", f"messages={f}", "max_new_tokens=16"
        )
        == got
    )


def test_seeded_sampling_is_reproducible(capsys):
    args = ["model.name=tiny-llama", f"prompt={PROMPT}", "max_new_tokens=24", "temperature=1.0", "top_p=0.9"]
    a = _generate(capsys, *args, "seed=1")
    assert _generate(capsys, *args, "seed=1") == a
    assert _generate(capsys, *args, "seed=2") != a
    assert _generate(capsys, *args[:3]) != a  # greedy


def test_prompt_is_taken_literally():
    gen, overrides = split_args(["prompt= yes: [1, 2]  ", "model.name=x", "temperature=0.5", "top_p=1"])
    assert gen["prompt"] == " yes: [1, 2]  " and overrides == ["model.name=x"]
    assert gen["temperature"] == 0.5 and gen["top_p"] == 1.0 and gen["max_new_tokens"] == 128 and gen["seed"] == 0


@pytest.mark.parametrize(
    "args, needle",
    [
        (["prompt=x", "tempreature=1"], "unknown generate argument 'tempreature'; did you mean 'temperature'"),
        (["max_new_tokens=4"], "give exactly one of prompt=TEXT or messages=FILE.json"),
        (["prompt=x", "messages=m.json"], "give exactly one of"),
        (["prompt=x", "max_new_tokens=many"], "max_new_tokens='many': expected int"),
        (["prompt=x", "temperature=-1"], "temperature=-1.0 must be >= 0"),
        (["prompt=x", "top_p=0"], "top_p=0.0 must be in (0, 1]"),
        (["prompt=x", "model.nmae=tiny-llama"], "did you mean 'model.name'"),
        (["messages=/no/such.json"], "messages=/no/such.json: cannot read it as JSON"),
        (["messages=BAD"], "expected a non-empty JSON list"),
        (["messages=GOOD"], "has no chat template; use prompt=TEXT"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(args, needle, tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps([{"role": "user"}]))
    (tmp_path / "good.json").write_text(json.dumps([{"role": "user", "content": "hi"}]))
    args = [a.replace("BAD", str(tmp_path / "bad.json")).replace("GOOD", str(tmp_path / "good.json")) for a in args]
    capsys.readouterr()
    assert main(["generate", "model.name=tiny-llama", *args]) == 2
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert out == "" and len(lines) == 1 and needle in lines[0], err
