"""`slimtune prune`: load model.name, prune it layer by layer (prune/layerwise.py) on the train split as a run
builds it, write the pruned dir (formats/pruned.py)."""

from __future__ import annotations

import time
from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.formats.pruned import is_sparse_model, read_sparse_manifest, save_sparse
from slimtune.prune.layerwise import prune_model
from slimtune.registry import PRUNE_METHODS
from slimtune.technique import options_of


def prune_command(cfg) -> Path:
    """`slimtune prune`: cfg.model.name pruned by cfg.prune.* on prune.calibration_samples blocks of
    data.source, written to cfg.output_dir (an HF model dir + slimtune_sparse.json)."""
    from slimtune.calibration import calibration_samples
    from slimtune.data import splits_for
    from slimtune.hardware import fixed_dtype
    from slimtune.formats.hf import load_model, load_tokenizer, resolve_model_dir

    cfg = fixed_dtype(cfg)  # model.dtype=auto not resolved by the command line: fp32
    p, out = cfg.prune, Path(cfg.output_dir)
    method = PRUNE_METHODS.get(p.method)
    method.validate(cfg)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise SlimtuneError(f"output_dir={str(out)!r} is not empty; pass overwrite=true or another output_dir")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model.name)
    model = load_model(cfg.model.name, "float32")
    samples = []
    if method.statistic is not None:
        # the train split as a run sees it: data.chat_template, data.packing and data.train_on applied
        samples = calibration_samples(splits_for(cfg, tokenizer).train, p.calibration_samples, cfg.train.seed)
    achieved = prune_model(model, samples, p.method, p.sparsity, p.pattern, p.scope, options_of(cfg, method))
    if cfg.model.dtype != "float32":
        from slimtune.formats.hf import DTYPES

        model.to(DTYPES[cfg.model.dtype])
    source = (
        read_sparse_manifest(cfg.model.name)["source_model"]
        if is_sparse_model(cfg.model.name)
        else str(resolve_model_dir(cfg.model.name))
    )
    mean = sum(achieved.values()) / max(len(achieved), 1)
    save_sparse(
        model,
        tokenizer,
        out,
        {
            "method": p.method,
            "pattern": p.pattern,
            "sparsity": p.sparsity,
            "scope": p.scope,
            "source_model": source,
            "matrices": achieved,
            "calibration_samples": len(samples),
            "data_source": cfg.data.source,
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )
    print(
        f"slimtune: wrote {out}/ ({p.method}, {p.pattern}, {len(achieved)} matrices at mean sparsity "
        f"{mean:.3f}, {time.perf_counter() - t0:.1f}s)"
    )
    return out
