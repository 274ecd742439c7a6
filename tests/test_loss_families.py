"""slimtune's loss on tiny random models of the families it supports, against each model's own
`model(input_ids, labels=...).loss`, and a 3-step LoRA (all-linear) run on each.

Every model is built from its transformers config class (hidden 64, 2 layers, 4 heads, the tiny-llama
tokenizer's vocabulary of 512, untied head). The families that change the logits after lm_head get a
transform that matters: their head weights are scaled so that Gemma-2's logits run far past its soft cap,
and Cohere's / Granite's scaling changes the loss by far more than the tolerance
(test_transform_is_not_vacuous checks that).
"""

import functools
import json
import math

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers.modeling_outputs import CausalLMOutputWithPast

from slimtune.errors import SlimtuneError
from slimtune.lm_loss import LOGIT_ATTRIBUTES, CausalLMLoss, LogitTransform, check_head, count_targets, logit_transform

VOCAB = 512  # the tiny-llama tokenizer's
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=False,
)

# family -> (config class, model class, config overrides, factor on lm_head's weight, the transform slimtune
# must read from the config). The factors put the raw logits z = lm_head(h) at max |z| ~ 10-20 (~0.7 at
# init): ~4x Gemma-2's cap of 5, and ~2.5 after Cohere's x 0.25 and Granite's / 8 (the real models also
# shrink large raw logits: Cohere by 0.0625, Granite by 1/8-1/16).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, 1.0, LogitTransform()),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, 1.0, LogitTransform()),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, 1.0, LogitTransform()),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"final_logit_softcapping": 5.0},
        30.0,
        LogitTransform(softcap=5.0),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, 1.0, LogitTransform()),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}, 32.0, LogitTransform(scale=1 / 8)),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}, 16.0, LogitTransform(scale=0.25)),
}
TRANSFORMED = [name for name, spec in FAMILIES.items() if spec[4] != LogitTransform()]


@functools.cache
def _model(family: str):
    """The tiny random model (fp32, eval mode, every parameter trainable). Built once per family: tests
    must leave its weights alone and clear the gradients they make."""
    config_cls, model_cls, overrides, head_factor, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**COMMON, **overrides)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_factor)
    return model


def _batch(seed=0, b=2, t=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :8] = -100  # a masked prompt
    return ids, labels


def test_every_family_builds_and_reads_its_transform():
    for family, spec in FAMILIES.items():
        model = _model(family)
        assert type(model).__name__ == spec[1]
        assert logit_transform(model.config) == spec[4], family


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [0, 7, 4096])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_loss_equals_hf_loss(family, chunk, grad):
    """CausalLMLoss / count_targets == model(ids, labels=labels).loss within 1e-5 (fp32); with grad, every
    parameter's gradient (lm_head's, and through the final hidden states all the others) matches autograd
    through the HF loss."""
    model = _model(family)
    ids, labels = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.set_grad_enabled(grad):
        want = model(input_ids=ids, labels=labels, use_cache=False).loss
        if grad:
            want.backward()
            want_grads = [p.grad.clone() for p in params]
            model.zero_grad(set_to_none=True)
        got = CausalLMLoss(model, chunk)(ids, labels) / count_targets(labels)
        assert got.requires_grad == grad
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=1e-5)
        if not grad:
            return
        try:
            got.backward()
            for (name, p), w in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], want_grads):
                assert p.grad is not None, name
                torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        finally:
            model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", TRANSFORMED)
def test_transform_is_not_vacuous(family):
    """Without its transform the loss is off by far more than the 1e-5 above (and Gemma-2's raw logits do
    run past the cap), so the tests above would catch a transform applied wrongly or not at all."""
    model = _model(family)
    ids, labels = _batch()
    with torch.no_grad():
        want = float(model(input_ids=ids, labels=labels, use_cache=False).loss)
        loss = CausalLMLoss(model, 7)
        loss.transform = LogitTransform()
        dropped = float(loss(ids, labels)) / count_targets(labels)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state
            assert float(model.get_output_embeddings()(hidden).abs().max()) > 3 * cap
    assert abs(dropped - want) > 0.1, (dropped, want)


class _ScaledLogitsLlama(transformers.LlamaForCausalLM):
    """A head slimtune cannot know about: forward multiplies the logits by 3 before the loss, with nothing
    in the config saying so."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        logits = out.logits * 3.0
        loss = self.loss_function(logits, labels, self.config.vocab_size) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_check_head_accepts_every_family():
    for family in FAMILIES:
        check_head(_model(family), family)


def test_check_head_refuses_a_forward_that_changes_the_logits():
    torch.manual_seed(0)
    model = _ScaledLogitsLlama(transformers.LlamaConfig(**COMMON)).eval()
    ids, labels = _batch()
    with torch.no_grad():  # the model's own loss really differs from slimtune's
        ours = float(CausalLMLoss(model, 7)(ids, labels)) / count_targets(labels)
        assert abs(float(model(input_ids=ids, labels=labels).loss) - ours) > 1e-2
    with pytest.raises(SlimtuneError, match="LOGIT_ATTRIBUTES"):
        check_head(model, "scaled")
    check_head(transformers.LlamaForCausalLM(model.config).eval(), "plain")  # the same model unpatched passes


@pytest.mark.parametrize("family", TRANSFORMED)
def test_check_head_refuses_a_family_whose_attribute_is_unknown(family, monkeypatch):
    """Each transform's table entry is what makes its family pass check_head."""
    attr = next(a for a in LOGIT_ATTRIBUTES if getattr(_model(family).config, a, None) is not None)
    monkeypatch.delitem(LOGIT_ATTRIBUTES, attr)
    with pytest.raises(SlimtuneError, match="LOGIT_ATTRIBUTES"):
        check_head(_model(family), family)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """family -> a model dir: the tiny model (save_pretrained) plus the tiny-llama tokenizer."""
    from slimtune.formats.hf import resolve_model_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_dir("tiny-llama"))
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for family in FAMILIES:
        dirs[family] = root / family
        _model(family).save_pretrained(dirs[family])
        tokenizer.save_pretrained(dirs[family])
    return dirs


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_all_linear_runs(family, saved_models, tmp_path):
    """3 steps of the lora recipe, adapter.target_modules=all-linear (its default), at lr 1e-2.

    Asserted: finite losses, 3 steps, one adapter per linear layer but lm_head in the saved adapter, and a
    lower eval perplexity after than before (the same held-out batches: -3% to -75% over seeds 0-3 on every
    family). Not asserted: final_loss < initial_loss: those are training losses of different batches, and
    the drop over 3 steps (0.01-1.0) is not always clear of the batch-to-batch spread (~0.03)."""
    from slimtune.config import load_config
    from slimtune.trainer import run

    out = tmp_path / "run"
    report = run(
        load_config(
            "lora",
            [
                f"model.name={saved_models[family]}",
                "model.dtype=float32",
                "train.seq_len=64",
                "train.batch_size=4",
                "train.warmup_steps=2",
                "train.max_steps=3",
                "train.lr=1e-2",
                "eval.max_batches=2",
                "logging.progress=false",
                f"output_dir={out}",
            ],
        )
    )
    assert report["steps"] == 3
    for key in ("initial_loss", "final_loss", "eval_perplexity_before", "eval_perplexity"):
        assert math.isfinite(report[key]), (key, report[key])
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert report["eval_perplexity"] < report["eval_perplexity_before"]

    model = _model(family)
    head = model.get_output_embeddings()
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    adapted = {k.split(".lora_A.")[0].removeprefix("base_model.model.") for k in adapter if ".lora_A." in k}
    assert adapted == linears
    assert any(bool(v.any()) for k, v in adapter.items() if ".lora_B." in k)  # B starts at 0: it trained
