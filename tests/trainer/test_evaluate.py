"""`slimtune eval data.source=FILE` scores every non-overlapping train.seq_len window of the whole file,
uncapped, and prints one JSON line; checked against the model's own loss window by window."""

import json
import os
import subprocess
import sys

import torch

from slimtune.formats.hf import load_model, load_tokenizer


def _reference(text: str, seq_len: int) -> tuple[float, int]:
    """(summed nats, targets): HF's own loss of each window (the tail window too), the tokens of the whole
    text + eos cut every seq_len tokens."""
    tok = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama").eval()
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    nats, targets = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), seq_len):
            w = torch.tensor([ids[s : s + seq_len]])
            if w.shape[1] < 2:
                continue
            nats += float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
            targets += w.shape[1] - 1
    return nats, targets


def test_eval_on_a_file_scores_all_of_it(tmp_path):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)[:6])
    f = tmp_path / "notes.txt"
    f.write_text(text)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "slimtune",
            "eval",
            "model.name=tiny-llama",
            f"data.source={f}",
            "train.seq_len=64",
            "eval.max_batches=1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout  # stdout holds the JSON object only
    got = json.loads(lines[0])
    nats, targets = _reference(text, 64)
    assert targets > 64 * 20  # far more than the few hundred tokens of a capped eval split
    assert got["eval_tokens"] == targets  # every window, eval.max_batches ignored
    assert abs(got["eval_loss"] - nats / targets) < 1e-5
    assert abs(got["eval_perplexity"] - torch.tensor(nats / targets).exp().item()) < 1e-4 * got["eval_perplexity"]

    # eval.split=true: the eval split of the same file (as a run's own eval), capped by eval.max_batches
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "slimtune",
            "eval",
            "model.name=tiny-llama",
            f"data.source={f}",
            "train.seq_len=64",
            "eval.split=true",
            "eval.max_batches=1",
            "train.batch_size=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    split = json.loads(r.stdout)
    assert split["eval_tokens"] == 2 * 63 and split["scored"] == "eval split"
