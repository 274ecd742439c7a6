"""The token cache and lazy packing (slimtune/data): the same blocks as the in-memory reference packers, built
once and reused (no tokenizer call on a hit), keyed by content, pre-tokenized sources, one line for a broken
entry."""

import json
import math

import numpy as np
import pytest
import torch

from slimtune.data import (
    IGNORE,
    build_blocks,
    build_splits,
    documents,
    load_records,
    pack,
    pack_documents,
    pad_documents,
    token_file,
)
from slimtune.data.cache import content_hash
from slimtune.errors import SlimtuneError
from slimtune.formats.hf import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


def reference(source, tokenizer, seq_len, packing):
    docs = documents(load_records(source), tokenizer, "assistant", source)
    if packing == "documents":
        return pack_documents(docs, seq_len)
    if packing == "none":
        return pad_documents(docs, seq_len, tokenizer.pad_token_id or tokenizer.eos_token_id)
    return pack([t for d, _ in docs for t in d], [t for _, y in docs for t in y], seq_len)


def mixed_jsonl(path, n=300):
    rng = np.random.default_rng(0)
    words = "the cache packs documents into blocks of tokens lazily from a memory map".split()
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(words, size=int(rng.integers(1, 120))))
            rec = {"text": text} if i % 3 else {"prompt": text[:40], "response": text[40:] or "ok"}
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.mark.parametrize("packing", ["documents", "stream", "none"])
@pytest.mark.parametrize("source", ["pydoc", "mixed"])
def test_lazy_blocks_equal_the_reference_packers(source, packing, tok, tmp_path):
    src = "pydoc" if source == "pydoc" else str(mixed_jsonl(tmp_path / "mixed.jsonl"))
    want = reference(src, tok, 64, packing)
    got = build_blocks(src, tok, 64, packing, cache_dir=tmp_path / "cache")
    assert len(got) == len(want)
    x, y, p = got.rows(slice(None))
    assert torch.equal(x, want.input_ids) and torch.equal(y, want.labels)
    assert (p is None and want.position_ids is None) or torch.equal(p, want.position_ids)
    idx = torch.tensor([len(want) - 1, 0, len(want) // 2])
    sub = got.subset(idx)
    assert torch.equal(sub.rows(slice(None))[0], want.input_ids[idx])
    if packing == "none":
        assert torch.equal(got.lengths(), (want.position_ids >= 0).sum(1))


def test_built_once_then_reused_without_the_tokenizer(tok, tmp_path, monkeypatch):
    src = mixed_jsonl(tmp_path / "a.jsonl")
    first = token_file(str(src), tok, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(type(tok), "__call__", lambda *a, **k: pytest.fail("tokenized again on a cache hit"))
    again = token_file(str(src), tok, cache_dir=tmp_path / "cache")
    assert again.path == first.path and np.array_equal(again.tokens, first.tokens)
    splits = build_splits(str(src), tok, 64, 0.1, "documents", cache_dir=tmp_path / "cache")
    assert len(splits.train) + len(splits.eval) == len(
        build_blocks(str(src), tok, 64, "documents", cache_dir=tmp_path / "cache")
    )


def test_a_changed_source_or_setting_is_a_new_entry(tok, tmp_path):
    src = mixed_jsonl(tmp_path / "a.jsonl")
    a = token_file(str(src), tok, cache_dir=tmp_path / "cache")
    b = token_file(str(src), tok, "all", cache_dir=tmp_path / "cache")  # data.train_on
    assert a.path != b.path and not np.array_equal(np.asarray(a.mask), np.asarray(b.mask))
    with open(src, "a") as f:
        f.write(json.dumps({"text": "one more record"}) + "\n")
    c = token_file(str(src), tok, cache_dir=tmp_path / "cache")
    assert c.path != a.path and len(c) > len(a)


def test_content_hash_is_remembered_per_file_version(tmp_path, monkeypatch):
    import slimtune.io

    src = mixed_jsonl(tmp_path / "a.jsonl")
    h = content_hash(str(src), tmp_path)
    monkeypatch.setattr(slimtune.io, "file_checksum", lambda p: pytest.fail("re-read an unchanged file"))
    assert content_hash(str(src), tmp_path) == h


def test_pretokenized_sources(tok, tmp_path):
    ids = np.random.default_rng(0).integers(0, len(tok), size=1000).astype(np.uint16)
    ids.tofile(tmp_path / "train.bin")
    blocks = build_blocks(str(tmp_path / "train.bin"), tok, 100, "stream", cache_dir=tmp_path / "cache")
    x, y, _ = blocks.rows(slice(None))
    assert torch.equal(x.reshape(-1), torch.from_numpy(ids.astype(np.int64))) and torch.equal(x, y)
    with open(tmp_path / "pre.jsonl", "w") as f:
        f.write(json.dumps({"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}) + "\n")
        f.write(json.dumps({"input_ids": [9, 10, 11]}) + "\n")
    tf = token_file(str(tmp_path / "pre.jsonl"), tok, cache_dir=tmp_path / "cache")
    assert tf.ids(0, len(tf)).tolist() == [5, 6, 7, 8, 9, 10, 11]
    assert tf.labels(0, len(tf)).tolist() == [IGNORE, IGNORE, 7, 8, 9, 10, 11]


def test_a_broken_entry_is_one_line(tok, tmp_path):
    tf = token_file("pydoc", tok, cache_dir=tmp_path / "cache")
    with open(tf.path / "tokens.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(SlimtuneError, match="a broken data cache entry .*tokens.bin is 10 bytes.*delete the directory"):
        token_file("pydoc", tok, cache_dir=tmp_path / "cache")


def test_cache_size_is_about_two_bytes_a_token(tok, tmp_path):
    tf = token_file("pydoc", tok, cache_dir=tmp_path / "cache")
    size = sum(f.stat().st_size for f in tf.path.iterdir() if f.suffix == ".bin")
    assert size / len(tf) <= 2.2


def test_a_mixture_draws_blocks_by_weight_and_keeps_each_eval_split(tok, tmp_path):
    from slimtune import config as C
    from slimtune.data import splits_for

    mixed = mixed_jsonl(tmp_path / "m.jsonl")
    cfg = C.load_config(
        "lora",
        [
            "model.name=tiny-llama",
            "train.seq_len=64",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"data.sources=[{{source: pydoc, weight: 0.75}}, {{source: {mixed}, weight: 0.25}}]",
        ],
    )
    splits = splits_for(cfg, tok)
    alone = [build_splits(s, tok, 64, 0.05, "documents", cache_dir=tmp_path / "cache") for s in ("pydoc", str(mixed))]
    assert len(splits.eval) == len(alone[0].eval) + len(alone[1].eval)
    share = np.bincount(splits.train.part, minlength=2) / len(splits.train)
    assert share == pytest.approx([0.75, 0.25], abs=0.01)  # the smaller source repeats to reach its weight
    rows = splits.train.rows(torch.arange(len(splits.train)))[0]
    for i in (0, len(splits.train) - 1):  # each row is its source's block
        part, block = int(splits.train.part[i]), int(splits.train.block[i])
        assert torch.equal(rows[i], alone[part].train.rows(torch.tensor([block]))[0][0])
    again = splits_for(cfg, tok)
    assert np.array_equal(again.train.block, splits.train.block)  # seeded: a resume sees the same mixture
    padded = splits_for(C.replace(cfg, **{"data.packing": "none"}), tok).train
    assert torch.equal(padded.lengths(), (padded.rows(slice(None))[2] >= 0).sum(1))


def test_epochs_set_the_steps_and_an_epoch_sees_every_block_once(tmp_path):
    from slimtune import config as C
    from slimtune.data import BatchOrder
    from slimtune.trainer import run
    from slimtune_testutil import TINY

    order = BatchOrder(50, seed=3)
    first, second = order.indices(0, 50), order.indices(50, 50)
    assert sorted(first.tolist()) == list(range(50)) == sorted(second.tolist()) and not torch.equal(first, second)
    report = run(
        C.load_config(
            "lora",
            [
                *TINY,
                "train.epochs=0.01",
                "eval.max_batches=1",
                f"output_dir={tmp_path / 'r'}",
                f"data.cache_dir={tmp_path / 'cache'}",
            ],
        )
    )
    assert report["steps"] == math.ceil(0.01 * report["train_blocks"] / 4)  # TINY: batch 4, one process


def test_data_prepare_builds_the_cache_a_run_then_finds(tmp_path, capsys):
    from slimtune.cli import main

    args = [
        "model.name=tiny-llama",
        "train.seq_len=64",
        f"data.cache_dir={tmp_path / 'cache'}",
        "logging.progress=false",
    ]
    assert main(["data", "prepare", "lora", *args]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] > 0 and out["train_blocks"] + out["eval_blocks"] == out["tokens"] // 64
    assert out["bytes_on_disk"] / out["tokens"] <= 2.2
    assert main(["data", "prepare", "lora", *args]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cache"] == out["cache"]


def test_tokenizing_in_processes_gives_the_same_file(tok, tmp_path, monkeypatch):
    import slimtune.data.cache as cache

    monkeypatch.setattr(cache, "BATCH_RECORDS", 37)  # several chunks, in order across the processes
    src = str(mixed_jsonl(tmp_path / "a.jsonl"))
    one = token_file(src, tok, cache_dir=tmp_path / "one", num_proc=1)
    two = token_file(src, tok, cache_dir=tmp_path / "two", num_proc=2)
    for name in ("tokens.bin", "mask.bin", "offsets.bin"):
        assert (one.path / name).read_bytes() == (two.path / name).read_bytes()
    want = documents(load_records(src), tok, "assistant", src)
    assert one.ids(0, len(one)).tolist() == [t for ids, _ in want for t in ids]
