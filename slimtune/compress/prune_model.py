"""`slimtune prune` on a whole model: layer-sequential calibration, pruning, and the sparse checkpoint.

Every nn.Linear inside the decoder layers is pruned (embeddings, norms and lm_head stay dense). The
calibration is layer-sequential, as in SparseGPT's and Wanda's code: the samples' hidden states at the
input of layer 0 are captured once, then for each layer i the statistics of its linears' inputs are
collected in one pass of the dense layer, all its linears are pruned, and the pruned layer is run
again to give layer i+1 its inputs. So each layer is calibrated on what the already-pruned layers below
produce, and only one layer's statistics exist at a time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from slimtune.compress.calibration import sample_inputs
from slimtune.compress.prune import magnitude_mask, parse_pattern, pattern_name, sparsegpt_prune, wanda_mask
from slimtune.errors import SlimtuneError
from slimtune.registry import DIR_VERIFIERS
from slimtune.io import atomic_dir, dir_checksums, loaded_files, manifest_path, verify_checksums, write_json

METHODS = ("magnitude", "wanda", "sparsegpt")
MANIFEST = "slimtune_sparse.json"
FORMAT = "slimtune-sparse"
FIX = "prune the model again with `slimtune prune`"


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of the decoder layers (`model.get_decoder().layers`)."""
    layers = model.get_decoder().layers
    for name, module in model.named_modules():
        if module is layers:
            return name, layers
    raise SlimtuneError("cannot find the decoder layers in the model")


def _layer_linears(layer: nn.Module) -> list[str]:
    return [name for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


def prunable_linears(model: nn.Module) -> list[str]:
    """Qualified names of every nn.Linear in the decoder layers, layer by layer."""
    prefix, layers = _decoder_layers(model)
    return [f"{prefix}.{i}.{name}" for i, layer in enumerate(layers) for name in _layer_linears(layer)]


class _Captured(Exception):
    """Raised by the pre-hook on layer 0 to stop the forward once its inputs are caught."""


def capture_layer_inputs(model: nn.Module, samples) -> list[tuple[torch.Tensor, dict]]:
    """(hidden_states, kwargs) at the input of decoder layer 0 for each sample: the kwargs are whatever
    the decoder passes the layer (transformers 5 Llama: attention_mask, position_embeddings = (cos, sin),
    position_ids, cache, use_cache, ...) so that each layer can be called alone with them."""
    _, layers = _decoder_layers(model)
    device = model.get_input_embeddings().weight.device
    caught: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, kwargs))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for sample in samples:
            ids, kwargs = sample_inputs(sample)
            try:
                model.get_decoder()(input_ids=ids.to(device), use_cache=False,
                                    **{k: v.to(device) for k, v in kwargs.items()})
            except _Captured:
                pass
    finally:
        handle.remove()
    return caught


def _run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    outs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)  # transformers 4 layers return tuples
    return outs


def _collect_stats(layer: nn.Module, names: list[str], inputs: list[tuple[torch.Tensor, dict]],
                   method: str) -> dict[str, torch.Tensor]:
    """One pass of `layer` on `inputs`; name (within the layer) -> fp32 statistic of that linear's input:
    wanda: sum over tokens of x_j^2 (in,); sparsegpt: H = 2 X X^T / n (in, in), accumulated as the
    reference does (H *= n / (n + b); H += 2 / (n + b) x x^T, n counting sequences)."""
    stats: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach()
            b = x.shape[0] if x.dim() == 3 else 1
            x = x.reshape(-1, x.shape[-1]).float()
            if method == "wanda":
                stats[name] = stats.get(name, 0) + x.square().sum(dim=0)
                return
            n = seen.get(name, 0)
            H = stats.get(name)
            H = torch.zeros(x.shape[1], x.shape[1], device=x.device) if H is None else H * (n / (n + b))
            stats[name] = H + (2 / (n + b)) * (x.T @ x)
            seen[name] = n + b

        return fn

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        _run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return stats


def _prune_linear(name: str, linear: nn.Linear, method: str, stat, sparsity: float, nm, scope: str,
                  blocksize: int, percdamp: float = 0.01) -> None:
    W = linear.weight.data
    if method != "magnitude" and stat is None:
        raise SlimtuneError(f"prune: {name} got no input during calibration; {method} needs its statistics")
    if method == "sparsegpt":
        W_new, _ = sparsegpt_prune(W, stat, sparsity, nm, blocksize=blocksize, percdamp=percdamp, scope=scope)
        W.copy_(W_new)
        return
    if method == "wanda":
        mask = wanda_mask(W, stat.sqrt(), sparsity, nm, scope)
    else:
        mask = magnitude_mask(W, sparsity, nm, scope)
    W.masked_fill_(~mask, 0)


@torch.no_grad()
def prune_model(model: nn.Module, samples, method: str, sparsity: float, pattern="unstructured",
                scope: str = "row", blocksize: int = 128, log=print, percdamp: float = 0.01) -> dict[str, float]:
    """Prune every linear of the decoder layers in place; returns name -> achieved sparsity (fraction of
    zeros). `samples`: input_ids tensors (1, T) or (N, T), or calibration_samples' (input_ids, labels,
    position_ids) (position ids as data.packing made them: no attention across packed documents), on any device;
    unused by magnitude. `pattern`: 'unstructured', 'n:m' (or parse_pattern's other forms)."""
    if method not in METHODS:
        raise ValueError(f"prune method {method!r}: expected one of {METHODS}")
    nm = parse_pattern(pattern)
    prefix, layers = _decoder_layers(model)
    if method != "magnitude" and not samples:
        raise SlimtuneError(f"prune method {method!r} needs calibration samples; got none")
    was_training = model.training
    model.eval()
    achieved: dict[str, float] = {}
    try:
        inputs = capture_layer_inputs(model, samples) if method != "magnitude" else []
        for i, layer in enumerate(layers):
            start = time.perf_counter()
            names = _layer_linears(layer)
            stats = _collect_stats(layer, names, inputs, method) if inputs else {}
            for name in names:
                linear, full = layer.get_submodule(name), f"{prefix}.{i}.{name}"
                _prune_linear(full, linear, method, stats.pop(name, None), sparsity, nm, scope, blocksize, percdamp)
                achieved[full] = (linear.weight == 0).float().mean().item()
            del stats
            if inputs and i + 1 < len(layers):
                outs = _run_layer(layer, inputs)  # the pruned layer feeds the next one
                inputs = [(h, kwargs) for h, (_, kwargs) in zip(outs, inputs)]
            mean = sum(achieved[f"{prefix}.{i}.{n}"] for n in names) / max(len(names), 1)
            log(f"prune layer {i}/{len(layers)}: {method} {pattern_name(nm)} sparsity {mean:.3f} "
                f"({time.perf_counter() - start:.1f}s)")
    finally:
        model.train(was_training)
    return achieved


def save_sparse(model: nn.Module, tokenizer, out_dir, manifest: dict) -> Path:
    """Write a model dir transformers loads plus slimtune_sparse.json, atomically (a failure leaves no
    partial dir). `manifest` keys: method, pattern, sparsity (the target), scope, source_model, matrices
    (name -> achieved sparsity); the pattern is stored as a string ('unstructured', '2:4', ...). The
    manifest also holds the checksums of the dir's files (write_sparse_record)."""
    missing = [k for k in ("method", "pattern", "sparsity", "scope", "source_model", "matrices")
               if k not in manifest]
    if missing:
        raise ValueError(f"sparse manifest lacks {missing}")
    record = {"format": FORMAT, "version": 1, **manifest,
              "pattern": pattern_name(parse_pattern(manifest["pattern"])),
              "source_model": str(manifest["source_model"])}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_sparse_record(tmp, record)
    return out_dir


def write_sparse_record(model_dir, record: dict) -> None:
    """slimtune_sparse.json in a complete model dir: `record` with the xxh3-128 checksums of the dir's files
    now (weights, config, tokenizer), replacing any it carried (a recovered dir's record is its base's)."""
    model_dir = Path(model_dir)
    write_json(model_dir / MANIFEST, {**record, "checksums": dir_checksums(model_dir)})


def read_sparse_manifest(model_dir) -> dict:
    """The slimtune_sparse.json of a pruned model dir (SlimtuneError if absent, not ours, or without
    checksums of its files; the names those list are checked, the files by verify_sparse)."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise SlimtuneError(f"{path}: not found; is {model_dir} a model written by `slimtune prune`?")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SlimtuneError(f"{path}: unreadable ({e}); {FIX}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != 1:
        got = record if isinstance(record, dict) else {}
        raise SlimtuneError(f"{path}: expected format {FORMAT!r} version 1, got "
                            f"{got.get('format')!r} version {got.get('version')!r}")
    sums = record.get("checksums")
    if not isinstance(sums, dict):
        raise SlimtuneError(f"{path}: no 'checksums' (written before pruned models carried checksums of their "
                            f"files, or tampered with); {FIX}")
    for name in sums:
        manifest_path(Path(model_dir), name, path, "checksums")
    return record


@DIR_VERIFIERS.register(MANIFEST)
def verify_sparse(model_dir) -> dict:
    """read_sparse_manifest, then every file a loader reads (weights, config, tokenizer: all but the
    manifest) listed in its checksums and matching; one line naming the first that is not."""
    model_dir = Path(model_dir)
    record = read_sparse_manifest(model_dir)
    required = sorted({"config.json", *loaded_files(model_dir)})
    verify_checksums(model_dir, record["checksums"], model_dir / MANIFEST, FIX, required)
    return record


def load_masks(model_dir, model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> keep-mask (weight != 0) of every matrix listed in model_dir's slimtune_sparse.json, read
    from `model` (the model loaded from model_dir)."""
    record = read_sparse_manifest(model_dir)
    masks = {}
    for name in record["matrices"]:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SlimtuneError(f"{Path(model_dir) / MANIFEST}: matrix {name!r} is not in the model") from None
        masks[name] = module.weight.detach() != 0
    return masks


def is_sparse_model(name: str) -> bool:
    """True for a model dir written by `slimtune prune` (or a recovery run's final/ of one)."""
    path = Path(name)
    return path.is_dir() and (path / MANIFEST).is_file()


def prune_command(cfg) -> Path:
    """`slimtune prune`: cfg.model.name pruned by cfg.prune.* on prune.calibration_samples blocks of
    data.source, written to cfg.output_dir (an HF model dir + slimtune_sparse.json)."""
    from slimtune.compress.calibration import calibration_samples
    from slimtune.data import splits_for
    from slimtune.hardware import fixed_dtype
    from slimtune.models import load_model, load_tokenizer, resolve_model_dir

    cfg = fixed_dtype(cfg)  # model.dtype=auto not resolved by the command line: fp32
    p, out = cfg.prune, Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise SlimtuneError(f"output_dir={str(out)!r} is not empty; pass overwrite=true or another output_dir")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model.name)
    model = load_model(cfg.model.name, "float32")
    samples = []
    if p.method != "magnitude":
        # the train split as a run sees it: data.chat_template, data.packing and data.train_on applied
        samples = calibration_samples(splits_for(cfg, tokenizer).train, p.calibration_samples, cfg.train.seed)
    achieved = prune_model(model, samples, p.method, p.sparsity, p.pattern, p.scope, p.blocksize,
                           percdamp=p.percdamp)
    if cfg.model.dtype != "float32":
        from slimtune.models import DTYPES

        model.to(DTYPES[cfg.model.dtype])
    source = read_sparse_manifest(cfg.model.name)["source_model"] if is_sparse_model(cfg.model.name) else \
        str(resolve_model_dir(cfg.model.name))
    mean = sum(achieved.values()) / max(len(achieved), 1)
    save_sparse(model, tokenizer, out, {"method": p.method, "pattern": p.pattern, "sparsity": p.sparsity,
                                        "scope": p.scope, "source_model": source, "matrices": achieved,
                                        "calibration_samples": len(samples), "data_source": cfg.data.source,
                                        "seconds": round(time.perf_counter() - t0, 2)})
    print(f"slimtune: wrote {out}/ ({p.method}, {p.pattern}, {len(achieved)} matrices at mean sparsity "
          f"{mean:.3f}, {time.perf_counter() - t0:.1f}s)")
    return out
