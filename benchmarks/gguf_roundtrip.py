"""GGUF export checked by llama.cpp itself (llama-cpp-python, the `bench` extra, built on this CPU).

    python benchmarks/gguf_roundtrip.py                    # SmolLM2-135M, QAT q4_0 for 24 steps of 4 x 256 tokens
    python benchmarks/gguf_roundtrip.py --model tiny-llama --steps 2 --seq-len 64

Each export is scored twice on the same held-out windows (the eval split of pydoc text, every window, text not
used for training): by slimtune (`loss_totals` on the model the export came from: the HF model, its q8_0
quantization in slimtune, a QAT run's converted final/) and by llama.cpp on the GGUF file (its logits for every
position of each window, the same next-token targets). Rows:
  f16                the base model: perplexity by both (target: within 0.1%), greedy 32 tokens identical
  q8_0               the base quantized to q8_0 (slimtune quant.method=q8_0 vs the GGUF): within 0.5%
  qat_q4_0           `slimtune run qat qat.method=q4_0` exported with its own codes: within 0.5% of the QAT model
  ft_requant_q4_0    the re-quantize route: the same fine-tuning without QAT (`full`), then quantized to q4_0
                     at export (byte for byte llama.cpp's quantizer): what QAT's codes are compared with
  q4_k, q6_k         the base quantized to a K type in slimtune (its 576-wide rows in llama.cpp's fallback
                     types q5_0 / q8_0) vs the GGUF
and, with no perplexity, `architectures`: small random Llama, Phi-3 and Gemma-2 models (hidden 256) exported
in f16 (the default type), llama.cpp's logits against transformers' on one sequence, and a SentencePiece-style
tokenizer (byte fallback, trained on pydoc: tests/slimtune_testutil.py) written as llama.cpp's "llama" model, its
tokenization of every pydoc topic against HF's; and `llama_cpp_bytes`: every linear weight of the base
quantized by llama.cpp's own library (ggml_quantize_chunk in llama-cpp-python's libggml-base, no importance
matrix: what llama-quantize runs) against slimtune's bytes, per stored type.
Table on stdout (file size, perplexity per side, ratios), JSON in --out.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gguf_roundtrip.json"
SIDES = ("f16", "q8_0", "qat_q4_0", "ft_requant_q4_0", "q4_k", "q6_k", "llama_cpp_bytes", "architectures")
PROMPT = "The for statement in Python"


def _run(cmd: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | {"TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"gguf_roundtrip: failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p.stdout


def eval_data(a):
    from slimtune import config as C
    from slimtune.data import splits_for
    from slimtune.formats.hf import load_tokenizer

    cfg = C.load_config("full", [f"model.name={a.model}", f"train.seq_len={a.seq_len}", "data.packing=stream"])
    return splits_for(cfg, load_tokenizer(a.model)).eval


def slimtune_ppl(model, blocks, a) -> float:
    import torch

    from slimtune.lm_loss import CausalLMLoss
    from slimtune.trainer.evaluate import loss_totals

    nats, tokens = loss_totals(CausalLMLoss(model.float().eval(), 1024), blocks, a.batch_size, 0, torch.device("cpu"))
    return math.exp(nats / tokens)


def llama_cpp_ppl(path: Path, blocks, a) -> float:
    """llama.cpp's perplexity of the same windows and targets (its logits at every position of each window)."""
    import numpy as np
    from llama_cpp import Llama

    from slimtune.data import eval_batches

    llm = Llama(model_path=str(path), n_ctx=a.seq_len, logits_all=True, n_threads=os.cpu_count(), verbose=False)
    nats, count = 0.0, 0
    for x, y, _ in eval_batches(blocks, a.batch_size, 0):
        for row, target in zip(x.tolist(), y.tolist()):
            llm.reset()
            llm.eval(row)
            logits = np.asarray(llm.scores[: len(row)], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            logz = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
            for i, t in enumerate(
                target[1:]
            ):  # labels unshifted, as slimtune's loss takes them: position i predicts i + 1
                if t != -100:
                    nats += logz[i] - logits[i, t]
                    count += 1
    return math.exp(nats / count)


GGML_TYPE_IDS = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12, "q6_k": 14}  # enum ggml_type


def llama_cpp_bytes(model_dir: str, types: tuple[str, ...]) -> dict:
    """Per requested type and stored type: how many linear weights of the model slimtune quantizes to exactly the
    bytes llama.cpp's ggml_quantize_chunk writes."""
    import ctypes

    import llama_cpp
    import numpy as np

    from slimtune.model.load import load_base
    from slimtune.quant.ggml import GGMLFormat, quantize_ggml

    lib = ctypes.CDLL(str(next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    weights = [m.weight.detach().float() for n, m in load_base(model_dir).named_modules() if n.endswith("_proj")]
    out = {}
    for t in types:
        fmt, counts = GGMLFormat(t), {}
        for w in weights:
            stored = fmt.stored_type(w.shape)
            ours = quantize_ggml(w, fmt).blocks.numpy()
            theirs, src = np.zeros_like(ours), np.ascontiguousarray(w.numpy())
            args = (ctypes.c_int(GGML_TYPE_IDS[stored]), src.ctypes.data_as(ctypes.c_void_p))
            args += (theirs.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(0), ctypes.c_int64(w.shape[0]))
            lib.ggml_quantize_chunk(*args, ctypes.c_int64(w.shape[1]), None)
            same, total = counts.get(stored, (0, 0))
            counts[stored] = (same + int(np.array_equal(ours, theirs)), total + 1)
        out[t] = {k: {"identical": same, "tensors": total} for k, (same, total) in counts.items()}
        print(f"llama_cpp_bytes {t}: {json.dumps(out[t])}", flush=True)
    return out


def architectures(tmp: Path) -> dict:
    """llama.cpp on small random Llama / Phi-3 / Gemma-2 exports (logits vs transformers) and on a
    SentencePiece-style vocabulary (token ids vs HF's on every pydoc topic)."""
    import llama_cpp
    import numpy as np
    import torch
    import transformers as T
    from pydoc_data.topics import topics

    sys.path.insert(0, str(ROOT / "tests"))
    from slimtune_testutil import sentencepiece_style_tokenizer

    from slimtune.formats.hf import load_tokenizer

    tok = load_tokenizer("tiny-llama")
    tok.pad_token = tok.eos_token
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})  # llama.cpp's Phi-3 loader needs it
    ids = tok.encode(topics[sorted(topics)[0]][:400], add_special_tokens=False)
    sizes = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    sizes |= dict(num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    models = {
        "llama": T.LlamaConfig(**sizes),
        "phi3": T.Phi3Config(**sizes, tie_word_embeddings=False),
        "gemma2": T.Gemma2Config(**sizes, head_dim=64, query_pre_attn_scalar=64),
    }
    out = {}
    for name, config in models.items():
        torch.manual_seed(0)
        model = getattr(
            T, config.architectures[0] if config.architectures else f"{type(config).__name__[:-6]}ForCausalLM"
        )
        model = model(config).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if name == "gemma2" and "norm" in n:
                    p.normal_(0, 0.3)  # Gemma's norms start at 0 (1 + w = 1): make them matter
        d = tmp / f"arch-{name}"
        model.save_pretrained(d)
        tok.save_pretrained(d)
        _run([sys.executable, "-m", "slimtune", "export", str(d), "--format", "gguf", "--out", str(d / "m.gguf")])
        llm = llama_cpp.Llama(str(d / "m.gguf"), logits_all=True, verbose=False, n_ctx=512)
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].numpy()
        out[name] = {
            "max_abs_logit_diff": float(np.abs(theirs - ours).max()),
            "max_abs_logit": float(np.abs(ours).max()),
            "argmax_agreement": float((theirs.argmax(1) == ours.argmax(1)).mean()),
        }
        print(f"architectures {name}: {json.dumps(out[name])}", flush=True)
    spm = tmp / "spm"
    vocab = len(sentencepiece_style_tokenizer(spm))
    T.LlamaForCausalLM(T.LlamaConfig(**{**sizes, "vocab_size": vocab})).save_pretrained(spm)
    _run([sys.executable, "-m", "slimtune", "export", str(spm), "--format", "gguf", "--out", str(spm / "m.gguf")])
    hf, llm = load_tokenizer(str(spm)), llama_cpp.Llama(str(spm / "m.gguf"), vocab_only=True, verbose=False)
    texts = [topics[k] for k in sorted(topics)]
    same = sum(hf.encode(t, add_special_tokens=False) == llm.tokenize(t.encode(), add_bos=False) for t in texts)
    out["sentencepiece_tokenizer"] = {"identical_topics": same, "topics": len(texts)}
    print(f"architectures tokenizer: {json.dumps(out['sentencepiece_tokenizer'])}", flush=True)
    return out


def greedy(a, model_dir: str, gguf: Path) -> dict:
    """32 greedy tokens of PROMPT by slimtune generate (fp32) and by llama.cpp on the GGUF."""
    from llama_cpp import Llama

    from slimtune.formats.hf import load_tokenizer

    out = subprocess.run(
        [sys.executable, "-m", "slimtune", "generate", f"model.name={model_dir}", f"prompt={PROMPT}"]
        + ["max_new_tokens=32", "temperature=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tok = load_tokenizer(a.model)
    ours = out.rstrip("\n")
    # the same prompt ids: slimtune generate applies the model's chat template when it has one
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tok.encode(PROMPT)
    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=os.cpu_count(), verbose=False)
    theirs = []
    for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        if t == tok.eos_token_id or len(theirs) == 32:
            break
        theirs.append(t)
    text = tok.decode(theirs, skip_special_tokens=True)
    return {"slimtune": ours, "llama_cpp": text, "identical": text.strip() == ours.strip()}


def greedy_only(a) -> None:
    from slimtune.formats.hf import resolve_model_dir

    res = json.loads(Path(a.out).read_text())
    with tempfile.TemporaryDirectory(prefix="gguf_roundtrip-") as tmp:
        path = Path(tmp) / "f16.gguf"
        base_dir = str(resolve_model_dir(a.model))
        _run([sys.executable, "-m", "slimtune", "export", base_dir, "--format", "gguf", "--out", str(path)])
        res["rows"]["f16"]["greedy_32"] = greedy(a, base_dir, path)
    print(json.dumps(res["rows"]["f16"]["greedy_32"]))
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--greedy-only", action="store_true", help="redo the f16 greedy check into --out's JSON")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {', '.join(SIDES)}")
    a = ap.parse_args()
    if a.greedy_only:
        return greedy_only(a)
    from slimtune.formats.hf import resolve_model_dir
    from slimtune.model.load import load_base
    from slimtune.quant import quantize_model

    base_dir = str(resolve_model_dir(a.model))
    blocks, rows, started = eval_data(a), {}, time.time()
    with tempfile.TemporaryDirectory(prefix="gguf_roundtrip-") as tmp:
        tmp = Path(tmp)

        summaries = {}

        def export(src: str, gguf_type: str) -> Path:
            out = tmp / f"{Path(src).name}-{gguf_type}.gguf"
            printed = _run(
                [sys.executable, "-m", "slimtune", "export", src, "--format", "gguf"]
                + ["--gguf-type", gguf_type, "--out", str(out)]
            )
            summaries[out] = json.loads(printed.strip().splitlines()[-1].split("(", 1)[1].rstrip().removesuffix(")"))
            return out

        train = [f"model.name={a.model}", "data.source=pydoc", "data.packing=stream", f"train.seq_len={a.seq_len}"]
        train += [f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}", f"train.lr={a.lr}"]
        train += ["eval.max_batches=1", "checkpoint.every=0", "logging.progress=false", "overwrite=true"]
        chosen = a.sides.split(",")
        if "qat_q4_0" in chosen:
            _run(
                [sys.executable, "-m", "slimtune", "run", "qat", *train, "qat.method=q4_0", f"output_dir={tmp / 'qat'}"]
            )
        if "ft_requant_q4_0" in chosen:
            _run([sys.executable, "-m", "slimtune", "run", "full", *train, f"output_dir={tmp / 'ft'}"])

        def quantized(model_dir: str, method: str):
            model = load_base(model_dir)
            quantize_model(model, method)
            return model

        sides = {
            "f16": (base_dir, "f16", lambda: load_base(base_dir)),
            "q8_0": (base_dir, "q8_0", lambda: quantized(base_dir, "q8_0")),
            "qat_q4_0": (str(tmp / "qat"), "q4_0", lambda: load_base(str(tmp / "qat" / "final"))),
            "ft_requant_q4_0": (str(tmp / "ft"), "q4_0", lambda: quantized(str(tmp / "ft" / "final"), "q4_0")),
            "q4_k": (base_dir, "q4_k", lambda: quantized(base_dir, "q4_k")),
            "q6_k": (base_dir, "q6_k", lambda: quantized(base_dir, "q6_k")),
        }
        if "llama_cpp_bytes" in chosen:
            agreement = llama_cpp_bytes(base_dir, ("q4_0", "q8_0", "q4_k", "q6_k"))
        if "architectures" in chosen:
            archs = architectures(tmp)
        for name, (src, gguf_type, model) in sides.items():
            if name not in chosen:
                continue
            t0 = time.time()
            path = export(src, gguf_type)
            ours, theirs = slimtune_ppl(model(), blocks, a), llama_cpp_ppl(path, blocks, a)
            rows[name] = {"bytes": path.stat().st_size, "slimtune_ppl": ours, "llama_cpp_ppl": theirs}
            rows[name]["fallback"] = summaries[path]["fallback"]
            rows[name]["llama_cpp_over_slimtune"] = theirs / ours
            if name == "f16":
                rows[name]["greedy_32"] = greedy(a, base_dir, path)
            print(f"{name}: {json.dumps(rows[name])} ({time.time() - t0:.0f}s)", flush=True)
    res = {
        "config": {"model": a.model, "steps": a.steps, "seq_len": a.seq_len, "batch_size": a.batch_size, "lr": a.lr},
        "minutes": round((time.time() - started) / 60, 1),
        "eval_windows": len(blocks),
        "versions": {k: md.version(k) for k in ("torch", "gguf", "llama_cpp_python", "slimtune")},
        "rows": rows,
    }
    if "qat_q4_0" in rows and "ft_requant_q4_0" in rows:
        res["qat_vs_requant_ppl"] = rows["qat_q4_0"]["llama_cpp_ppl"] / rows["ft_requant_q4_0"]["llama_cpp_ppl"]
    if "llama_cpp_bytes" in chosen:
        res["llama_cpp_bytes"] = agreement
    if "architectures" in chosen:
        res["architectures"] = archs
    lines = [f"{'side':18s}{'MiB':>8s}{'slimtune ppl':>14s}{'llama.cpp ppl':>15s}{'ratio':>9s}"]
    for name, r in rows.items():
        lines.append(
            f"{name:18s}{r['bytes'] / 2**20:8.1f}{r['slimtune_ppl']:14.3f}{r['llama_cpp_ppl']:15.3f}"
            f"{r['llama_cpp_over_slimtune']:9.4f}"
        )
    if "f16" in rows:
        lines.append(f"greedy 32 tokens identical (f16): {rows['f16']['greedy_32']['identical']}")
    print("\n".join(lines))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
