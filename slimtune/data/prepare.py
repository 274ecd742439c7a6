"""`slimtune data prepare RECIPE`: build a run's data cache ahead of its launch (a torchrun launch then finds it
built instead of every rank waiting on the first), and say what the run will see."""

from __future__ import annotations

import time

from slimtune.data.splits import splits_for


def prepare_command(cfg, tokenizer) -> dict:
    """Tokenize cfg's data (data.source, or each of data.sources) with model.name's tokenizer into the cache, or
    find it there; returns each entry and the split's sizes."""
    t0 = time.perf_counter()
    splits = splits_for(cfg, tokenizer)
    views = splits.train.parts if hasattr(splits.train, "parts") else [splits.train]
    entries = []
    for view in views:
        tf = view.tf
        files = [f for f in tf.path.iterdir() if f.is_file()] if tf.path.is_dir() else [tf.path]
        entries.append(
            {
                "cache": str(tf.path),
                "tokens": len(tf),
                "documents": tf.documents,
                "bytes_on_disk": sum(f.stat().st_size for f in files),
            }
        )
    out = {
        "sources": [p["source"] for p in cfg.data.sources] or [cfg.data.source],
        "entries": entries,
        "train_blocks": len(splits.train),
        "eval_blocks": len(splits.eval),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if len(entries) == 1:
        out.update(entries[0])
    return out
