"""Sources, packing, prompt masking, split determinism and world-size-invariant batch order."""

import json

import pytest
import torch

from slimtune.data import IGNORE, BatchOrder, build_splits, load_records, micro_batch, pack, tokenize
from slimtune.errors import SlimtuneError
from slimtune.formats.hf import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


def test_pydoc_is_real_text():
    recs = load_records("pydoc")
    assert sum(len(r["text"]) for r in recs) > 300_000


def test_prompt_response_masks_prompt(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text(
        json.dumps({"prompt": "Question: what is a list?", "response": " A mutable sequence."})
        + "\n"
        + json.dumps({"text": "plain text line"})
        + "\n"
    )
    ids, labels = tokenize(load_records(str(p)), tok)
    n_prompt = len(tok("Question: what is a list?", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    resp = tok(" A mutable sequence.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels[n_prompt : n_prompt + len(resp)] == resp == ids[n_prompt : n_prompt + len(resp)]
    assert labels[n_prompt + len(resp) :] == ids[n_prompt + len(resp) :]  # text: every token counts


def test_pack_drops_tail_and_keeps_order():
    b = pack(list(range(10)), list(range(10)), 3)
    assert b.input_ids.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_split_is_deterministic_and_disjoint(tok):
    a = build_splits("pydoc", tok, 64, 0.1)
    b = build_splits("pydoc", tok, 64, 0.1)
    assert torch.equal(a.eval.input_ids, b.eval.input_ids)
    train_rows = {tuple(r) for r in a.train.input_ids.tolist()}
    assert not any(tuple(r) in train_rows for r in a.eval.input_ids.tolist()[:50])


def test_global_batch_same_for_any_world_size():
    ids = torch.arange(40).view(20, 2)
    from slimtune.data import Blocks

    blocks, order = Blocks(ids, ids), BatchOrder(20, seed=3)
    for step in range(4):  # crosses an epoch boundary at sample 20
        one = torch.cat([micro_batch(blocks, order, step, m, 0, 1, 3, 2)[0] for m in range(2)])
        two = torch.cat([micro_batch(blocks, order, step, 0, r, 2, 3, 1)[0] for r in range(2)])
        assert sorted(one[:, 0].tolist()) == sorted(two[:, 0].tolist())


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json}\n", "not valid JSON"),
        (
            json.dumps({"prompt": "x"}) + "\n",
            "needs a 'text' string, 'prompt' and 'response' strings, 'messages' or 'input_ids'",
        ),
    ],
)
def test_bad_jsonl(tmp_path, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(SlimtuneError, match=needle):
        load_records(str(p))


def test_missing_file_and_too_small(tmp_path, tok):
    with pytest.raises(SlimtuneError, match="file not found"):
        load_records(str(tmp_path / "nope.txt"))
    p = tmp_path / "small.txt"
    p.write_text("tiny")
    with pytest.raises(SlimtuneError, match="too few to split"):
        build_splits(str(p), tok, 64, 0.1)
