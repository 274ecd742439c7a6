"""A run directory is untrusted input (run dirs get downloaded): a snapshot manifest naming a unit or a file
outside the store, or a checkpoint whose trainer_state.json points at a snapshot outside this run's store,
stops `slimtune run ... resume=true` with one line (exit 2) before any file is created, linked or deleted."""

import json
import shutil

from slimtune.cli import main

ARGS = [
    "model.name=tiny-llama",
    "model.dtype=float32",
    "train.seq_len=64",
    "train.batch_size=2",
    "train.warmup_steps=2",
    "eval.max_batches=1",
    "logging.progress=false",
    "train.max_steps=3",
    "engine.name=offload",
    "checkpoint.every=2",
]


def _tree(root):
    """Every file under `root` with its inode and link count: a file created, deleted or linked shows."""
    return sorted((str(p), p.lstat().st_ino, p.lstat().st_nlink) for p in root.rglob("*") if not p.is_dir())


def _tamper(path, text) -> None:
    """Write `text` to `path`, and its checksum into the checkpoint's checksums.json as a tamperer would."""
    path.write_text(text)
    sums = path.parent / "checksums.json"
    if sums.is_file():
        from slimtune.io import file_checksum

        listing = json.loads(sums.read_text())
        listing["checksums"][path.name] = file_checksum(path)
        sums.write_text(json.dumps(listing))


def test_a_tampered_run_dir_is_refused_before_anything_is_touched(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "full", *ARGS, f"output_dir={out}"]
    assert main(args) == 0
    snap = out / "offload" / "snapshots" / "step_2"
    manifest_file, state_file = snap / "manifest.json", out / "checkpoints" / "step_2" / "trainer_state.json"
    sums_file = state_file.parent / "checksums.json"  # where checkpoints list their files' checksums
    original = {f: f.read_text() for f in (manifest_file, state_file, sums_file) if f.is_file()}
    manifest, state = json.loads(original[manifest_file]), json.loads(original[state_file])
    victim = tmp_path / "outside" / "victim.bin"
    victim.parent.mkdir()
    shutil.copy(snap / manifest["files"]["layer.0"], victim)  # a valid unit file, outside the snapshot
    shutil.copytree(snap, tmp_path / "outside" / "step_2")  # a valid snapshot, outside this run's store

    def files(**changed):
        return json.dumps({**manifest, "files": {**manifest["files"], **changed}})

    escaped = {("../../escaped" if u == "layer.0" else u): f for u, f in manifest["files"].items()}
    cases = [
        (manifest_file, json.dumps({**manifest, "files": escaped}), ["manifest.json", "unit '../../escaped'"]),
        (manifest_file, files(**{"layer.0": str(victim)}), ["manifest.json", "files['layer.0']", str(victim)]),
        (
            manifest_file,
            files(**{"layer.0": "../../../../outside/victim.bin"}),
            ["manifest.json", "files['layer.0']", "'../../../../outside/victim.bin'"],
        ),
        (
            state_file,
            json.dumps({**state, "offload": str(tmp_path / "outside" / "step_2")}),
            ["trainer_state.json", '"offload"', "resume with the output_dir and offload.dir"],
        ),
    ]
    for path, text, needles in cases:
        for f, good in original.items():
            f.write_text(good)
        _tamper(path, text)
        tree = _tree(tmp_path)
        capsys.readouterr()
        rc = main([*args, "resume=true"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err[-3000:]
        last = [ln for ln in err.splitlines() if ln.strip()][-1]
        assert all(n in last for n in needles), last
        assert _tree(tmp_path) == tree, needles  # nothing created, deleted or linked (the live store came and went)
    for f, good in original.items():
        f.write_text(good)
    assert main([*args, "resume=true"]) == 0  # untampered, the same run dir resumes
