"""Every combination of the main options trains, or is refused before anything loads in one line.

A pairwise covering set over FACTORS, whose values are read from the config (`config.choices`: a registry's
names or a field's fixed set; False/True for a flag), so a newly registered value is covered without editing
this file. Every pair of values of two factors appears in a row that trains 2 steps on tiny-llama; a pair
that no valid row can hold appears in a row of its own (the pair on the recipe's defaults) that
`slimtune run` must refuse with exit 2 and one line on stderr naming the two keys in conflict (one of them
the pair's: the other may be a key the pair's value needs set, e.g. adapter.type=lq_lora needs quant.method=
lq_lora), raised by the checks
that run before loading (config validation + the model-kind checks of trainer/preflight.py), never a
traceback. A row that passes those checks must train (refusing it after loading is a failure too), and
the final/ it writes must load and evaluate (`slimtune eval model.name=RUN/final`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time

import pytest

from slimtune import config as C
from slimtune.cli import main
from slimtune_testutil import TINY

BASE_RECIPE = "lora"
RUN = [*TINY, "train.max_steps=2", "eval.max_batches=1", "checkpoint.every=0"]
# key -> values; None: read them from the config (choices, or False/True for a flag)
FACTORS = {
    "adapter.type": None,
    "quant.method": None,
    "quant.backend": None,
    "optim.name": None,
    "optim.state_bits": None,
    "optim.in_backward": None,
    "optim.master_dtype": None,
    "train.max_grad_norm": (0.0, 1.0),
    "train.grad_accum": (1, 2),
    "train.precision": None,
    "train.activation_checkpointing": None,
    "engine.params": None,
    "engine.optimizer": None,
    "base": ("dense", "pruned"),  # model.name: tiny-llama, or tiny-llama pruned to 50% (a recovery run)
    "data.packing": None,
    "adapter.init": None,
    "engine.name": None,
    "qat.method": ("none", "int4"),
}
KEY = re.compile(r"\b([a-z_]+\.[a-z_0-9]+)")


def factor_values() -> dict[str, tuple]:
    """key -> its values, the base recipe's own value first (a row's unset factors take it)."""
    recipe, out = C.load_config(BASE_RECIPE, RUN), {}
    for key, values in FACTORS.items():
        if values is None:
            values = C.choices(key)
            if values is None:
                assert isinstance(C._get(recipe, key), bool), f"{key}: no choices and not a flag"
                values = (False, True)
        default = C._get(recipe, key) if key != "base" else values[0]
        assert default in values, f"{key}: the recipe's {default!r} is not among {values}"
        out[key] = (default, *(v for v in values if v != default))
    return out


def overrides(row: dict, pruned_dir: str) -> list[str]:
    out = []
    for key, value in row.items():
        if key == "base":
            out.append(f"model.name={'tiny-llama' if value == 'dense' else pruned_dir}")
        else:
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


class Checker:
    """Whether a row passes every check that runs before loading (cached): None, or the refusal's text."""

    def __init__(self, pruned_dir: str):
        from slimtune.trainer.preflight import check_run

        self.pruned_dir, self.check_run, self.cache = pruned_dir, check_run, {}

    def __call__(self, row: dict) -> str | None:
        key = tuple(sorted(row.items()))
        if key not in self.cache:
            try:
                self.check_run(C.load_config(BASE_RECIPE, RUN + overrides(row, self.pruned_dir)), world=1)
                self.cache[key] = None
            except C.ConfigError as e:
                self.cache[key] = str(e)
        return self.cache[key]


def repair(row: dict, values: dict, refused, fixed: set, depth: int = 4) -> dict | None:
    """A passing row from `row` changing only the factors its refusals name (never those in `fixed`), or None."""
    fixed = set(fixed)
    for _ in range(depth):
        msg = refused(row)
        if msg is None:
            return row
        named = [k for k in dict.fromkeys(KEY.findall(msg)) if k in values and k not in fixed]
        if "model.name" in msg and "base" not in fixed:
            named.append("base")
        moves = [{**row, k: v} for k in named for v in values[k] if v != row[k]]
        passing = next((m for m in moves if refused(m) is None), None)
        if passing is not None:
            return passing
        progress = next((m for m in moves if refused(m) != msg), None)
        if progress is None:
            return None
        fixed |= {k for k in named if progress[k] != row[k]}
        row = progress
    return row if refused(row) is None else None


def covering_rows(values: dict[str, tuple], refused) -> tuple[list[dict], list[tuple]]:
    """(rows that pass the checks, pairs no passing row holds): greedy (AETG-like), each row seeded by the
    first uncovered pair (repaired: the factors its refusal names changed), then completed factor by factor
    with the value covering most new pairs among those that keep the row passing (the factors left unset at
    the recipe's defaults)."""
    keys = list(values)
    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(keys, 2) for va in values[a] for vb in values[b]}
    rows, refused_pairs = [], []

    def gain(row, key, value):
        return sum(((k, row[k]), (key, value)) in uncovered or ((key, value), (k, row[k])) in uncovered for k in row)

    while uncovered:
        (a, va), (b, vb) = min(uncovered, key=repr)
        defaults = {k: values[k][0] for k in keys}
        seed = repair({**defaults, a: va, b: vb}, values, refused, {a, b})
        if seed is None:
            refused_pairs.append(((a, va), (b, vb)))
            uncovered.discard(((a, va), (b, vb)))
            continue
        row = {k: v for k, v in seed.items() if k in (a, b) or v != defaults[k]}
        for key in sorted((k for k in keys if k not in row), key=lambda k: -len(values[k])):
            scored = sorted(values[key], key=lambda v: -gain(row, key, v))
            row[key] = next((v for v in scored if refused({**defaults, **row, key: v}) is None), defaults[key])
        row = {**defaults, **row}
        assert refused(row) is None, (row, refused(row))
        rows.append(row)
        for x, y in itertools.combinations(keys, 2):
            uncovered.discard(((x, row[x]), (y, row[y])))
    return rows, refused_pairs


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "w50"
    assert main(["prune", *TINY, "model.name=tiny-llama", "prune.calibration_samples=4", f"output_dir={out}"]) == 0
    return str(out)


def test_every_combination_trains_or_is_refused_in_one_line(pruned_dir, tmp_path, capsys):
    values = factor_values()
    check = Checker(pruned_dir)
    t0 = time.perf_counter()
    rows, refused_pairs = covering_rows(values, check)
    seconds = time.perf_counter() - t0
    failures, refusals = [], []
    for (a, va), (b, vb) in refused_pairs:  # each refused on its own, through the CLI
        row = {a: va, b: vb}
        capsys.readouterr()
        code = main(["run", BASE_RECIPE, *RUN, *overrides(row, pruned_dir), f"output_dir={tmp_path / 'refused'}"])
        err = capsys.readouterr().err.strip()
        named = set(KEY.findall(err)) & set(C.all_keys())
        pair = {k if k != "base" else "model.name" for k in (a, b)}
        if code != 2 or "\n" in err or "Traceback" in err or len(named) < 2 or not pair & named:
            failures.append(f"refused {row}: exit {code}, stderr {err[-400:]!r}")
        refusals.append(f"{a}={va} {b}={vb}: {err.removeprefix('slimtune: error: ')[:150]}")
    trained = 0
    for i, row in enumerate(rows):
        out = tmp_path / f"row{i}"
        capsys.readouterr()
        try:
            code = main(["run", BASE_RECIPE, *RUN, *overrides(row, pruned_dir), f"output_dir={out}"])
        except Exception as e:  # noqa: BLE001  (a crash: report the row, go on with the rest)
            failures.append(f"row {i} {row}: crashed: {type(e).__name__}: {str(e)[:300]}")
            continue
        err = capsys.readouterr().err
        if code != 0 or not (out / "report.json").is_file():
            failures.append(f"row {i} {row}: passed the checks but exit {code}: {err.strip()[-400:]!r}")
            continue
        code = main(["eval", *TINY, f"model.name={out / 'final'}", "eval.max_batches=1"])  # what it wrote loads
        result = capsys.readouterr()
        if code != 0 or not math.isfinite(json.loads(result.out.strip().splitlines()[-1])["eval_perplexity"]):
            failures.append(f"row {i} {row}: its final/ does not evaluate: {result.err.strip()[-400:]!r}")
            continue
        trained += 1
    with capsys.disabled():
        print(
            f"\ncovering set over {len(values)} factors ({seconds:.0f}s to generate): {trained} of {len(rows)} "
            f"rows trained and evaluated; {len(refused_pairs)} pairs refused before loading:"
        )
        for line in refusals:
            print("  refused", line)
    assert not failures, "\n".join(failures)
