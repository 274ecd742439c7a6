"""Chat data (messages through the chat template, loss on assistant turns), document-aware packing (a packed
block's loss equals the sum of its documents' losses computed one by one), padded batches, and local data
sets (.parquet, datasets.save_to_disk)."""

import json

import pytest
import torch

from slimtune.chat import chat_tokens
from slimtune.cli import main
from slimtune.data import (
    IGNORE,
    BatchOrder,
    build_blocks,
    documents,
    load_records,
    micro_batch,
    pack_documents,
    pad_documents,
)
from slimtune.errors import SlimtuneError
from slimtune.lm_loss import CausalLMLoss
from slimtune.formats.hf import load_model, load_tokenizer
from slimtune_testutil import TINY

# ChatML, as SmolLM2's tokenizer has it
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a tuple?"},
        {"role": "assistant", "content": "An immutable sequence."},
    ],
    [
        {"role": "user", "content": "Name a loop."},
        {"role": "assistant", "content": "for"},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "while"},
    ],
]


@pytest.fixture(scope="module")
def tok():
    t = load_tokenizer("tiny-llama")
    t.chat_template = TEMPLATE
    return t


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model("tiny-llama").eval()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_assistant_turns_carry_the_loss(tok):
    ids, labels = chat_tokens(CHATS[1], tok, "assistant", "x")
    text = tok.apply_chat_template(CHATS[1], tokenize=False)
    assert tok.decode(ids) == text
    learned = tok.decode([t for t, y in zip(ids, labels) if y != IGNORE])
    # exactly the two assistant replies, each with the turn's closing marker
    assert learned == "for<|im_end|>\nwhile<|im_end|>\n"
    _, every = chat_tokens(CHATS[1], tok, "all", "x")
    assert every == ids


def test_messages_need_a_template_or_chat_template_file(tmp_path):
    src = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS] * 20)
    out = tmp_path / "run"
    assert main(["run", "lora", *TINY, f"data.source={src}", f"output_dir={out}"]) == 2
    tpl = tmp_path / "chatml.jinja"
    tpl.write_text(TEMPLATE)
    assert (
        main(
            [
                "run",
                "lora",
                *TINY,
                f"data.source={src}",
                f"data.chat_template={tpl}",
                "train.seq_len=32",
                "train.max_steps=2",
                "eval.max_batches=1",
                f"output_dir={out}",
            ]
        )
        == 0
    )


@pytest.mark.parametrize("bad", [{"messages": []}, {"messages": [{"role": "user"}]}, {"messages": "hi"}])
def test_malformed_messages_are_named(tmp_path, bad):
    src = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, bad])
    with pytest.raises(SlimtuneError, match=r"bad.jsonl:2: 'messages' must be"):
        load_records(str(src))


def test_packed_block_loss_is_the_sum_of_its_documents(model, tok):
    torch.manual_seed(1)
    docs = [(d, list(d)) for d in (torch.randint(3, 500, (n,)).tolist() for n in (9, 17, 4, 30))]
    blocks = pack_documents(docs, seq_len=20)  # 60 tokens: 3 blocks, documents cut at block ends
    loss = CausalLMLoss(model, chunk_tokens=64)
    with torch.no_grad():
        packed = sum(
            float(loss(blocks.input_ids[i : i + 1], blocks.labels[i : i + 1], blocks.position_ids[i : i + 1]))
            for i in range(len(blocks))
        )
        # each segment on its own: the pieces each document was cut into
        one_by_one, flat = 0.0, [t for d, _ in docs for t in d]
        starts = (blocks.position_ids.reshape(-1) == 0).nonzero().squeeze(1).tolist() + [len(flat)]
        for a, b in zip(starts, starts[1:]):
            x = torch.tensor(flat[a:b])[None]
            if b - a >= 2:
                one_by_one += float(loss(x, x))
    assert packed == pytest.approx(one_by_one, rel=1e-5)
    # and it differs from the stream (attention across documents)
    with torch.no_grad():
        stream = sum(float(loss(blocks.input_ids[i : i + 1], blocks.input_ids[i : i + 1])) for i in range(len(blocks)))
    assert abs(stream - packed) > 1e-3


def test_padded_rows_match_documents_alone_and_batches_group_by_length(model):
    torch.manual_seed(2)
    docs = [(d, list(d)) for d in (torch.randint(3, 500, (n,)).tolist() for n in (5, 19, 11, 7, 3, 15))]
    blocks = pad_documents(docs, seq_len=16, pad_id=2)  # the 19-token one becomes 16 + 3
    assert len(blocks) == 7 and bool((blocks.labels[blocks.position_ids < 0] == IGNORE).all())
    loss = CausalLMLoss(model, chunk_tokens=64)
    order = BatchOrder(len(blocks), seed=0, lengths=blocks.lengths())
    x, y, pos = micro_batch(blocks, order, 0, 0, 0, 1, 3, 1)
    assert x.shape[1] == int((pos >= 0).sum(1).max())  # trimmed to the longest row
    lens = (pos >= 0).sum(1).tolist()
    assert lens == sorted(lens, reverse=True)
    with torch.no_grad():
        got = float(loss(x, y, pos))
        want = sum(float(loss(x[r : r + 1, :n], y[r : r + 1, :n])) for r, n in enumerate(lens))
    assert got == pytest.approx(want, rel=1e-5)


def test_packing_modes_and_train_on_from_a_run(tmp_path):
    src = _write_jsonl(
        tmp_path / "pr.jsonl", [{"prompt": f"Q{i}: what is {i}?", "response": f"It is {i}."} for i in range(200)]
    )
    for packing in ("documents", "stream", "none"):
        out = tmp_path / packing
        assert (
            main(
                [
                    "run",
                    "lora",
                    *TINY,
                    f"data.source={src}",
                    f"data.packing={packing}",
                    "train.seq_len=32",
                    "train.max_steps=3",
                    "eval.max_batches=2",
                    f"output_dir={out}",
                ]
            )
            == 0
        )
        assert json.loads((out / "report.json").read_text())["final_loss"] > 0


def test_local_datasets_parquet_and_save_to_disk(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"messages": c} for c in CHATS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    assert load_records(str(tmp_path / "chat.parquet")) == rows
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_records(str(tmp_path / "saved")) == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert load_records(str(tmp_path / "dd")) == rows
    assert documents(rows, tok)[0] == chat_tokens(CHATS[0], tok, "assistant", "x")
    blocks = build_blocks(str(tmp_path / "chat.parquet"), tok, 16, "documents")
    assert blocks.position_ids is not None and len(blocks) >= 1
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(SlimtuneError, match="bad.parquet: not a readable parquet file"):
        load_records(str(tmp_path / "bad.parquet"))
