"""slimtune's low-precision kernels: accuracy everywhere, speed where there is a GPU.

    python benchmarks/triton_kernels.py                  # CPU: error table of every format/kernel (torch references)
    python benchmarks/triton_kernels.py --tokens 4096    # on a CUDA machine also TFLOP/s vs torch._scaled_mm / bf16

Error table (any device): relative Frobenius error ||y - y_ref|| / ||y_ref|| of each low-precision matmul
against the fp32 matmul of the unquantized operands, on LLM-sized weights (4096x4096, 11008x4096) and
--tokens activation rows; the Hadamard rotation's orthonormality error; linear-cross-entropy's loss error.
On CUDA (triton kernels): TFLOP/s of fp8_matmul vs torch._scaled_mm, mxfp4_matmul and nf4_matmul vs
bf16 torch.matmul, and peak CUDA memory of linear_cross_entropy vs naive logits at vocab 49152.
On CPU it says that speed needs a GPU (the CPU memory of the chunked reference loss is measured by
benchmarks/chunked_loss.py). Results: a table on stdout and JSON in --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from slimtune.kernels.fp8_matmul import fp8_matmul, quantize_fp8
from slimtune.kernels.hadamard import hadamard_transform
from slimtune.kernels.linear_cross_entropy import linear_cross_entropy
from slimtune.kernels.mxfp4 import mxfp4_matmul, quantize_mxfp4
from slimtune.kernels.nf4_matmul import nf4_matmul
from slimtune.quant.nf4 import quantize_nf4

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "kernels.json"
SHAPES = [(4096, 4096), (11008, 4096)]  # (out, in) of LLM linears


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def matmuls(x: torch.Tensor, w: torch.Tensor) -> dict:
    """name -> callable computing x @ w.T through that format (operands quantized once, outside)."""
    xq, xs = quantize_fp8(x, "e4m3", axis=-1)
    wq, ws = quantize_fp8(w, "e4m3", axis=-1)
    w_packed, w_scales = quantize_mxfp4(w)
    w_nf4 = quantize_nf4(w, 64, double_quant=True)
    return {
        "fp8 e4m3 (per-row scales)": lambda: fp8_matmul(xq, xs, wq, ws, out_dtype=torch.float32),
        "mxfp4 weight (RTN)": lambda: mxfp4_matmul(x, w_packed, w_scales, out_dtype=torch.float32),
        "nf4 weight (b64, dq)": lambda: nf4_matmul(x, w_nf4.operand()),
        "bf16 matmul": lambda: (x.bfloat16() @ w.bfloat16().T).float(),
    }


def gpu_tflops(fn, flops: float) -> float:
    import triton.testing

    ms = triton.testing.do_bench(fn)
    return flops / (ms * 1e-3) / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=256, help="activation rows of each matmul")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for n, k in SHAPES:
        x = torch.randn(a.tokens, k, device=device, generator=g)
        w = torch.randn(n, k, device=device, generator=g) * 0.02
        ref = x @ w.T
        for name, fn in matmuls(x, w).items():
            row = {"op": name, "shape": f"{a.tokens}x{k} @ {n}x{k}^T", "rel_error": rel_err(fn(), ref)}
            if device.type == "cuda":
                row["tflops"] = gpu_tflops(fn, 2 * a.tokens * n * k)
            rows.append(row)
        if device.type == "cuda" and hasattr(torch, "_scaled_mm"):
            xq, xs = quantize_fp8(x, "e4m3")
            wq, ws = quantize_fp8(w, "e4m3")
            rows.append(
                {
                    "op": "torch._scaled_mm (per-tensor)",
                    "shape": f"{a.tokens}x{k} @ {n}x{k}^T",
                    "tflops": gpu_tflops(
                        lambda: torch._scaled_mm(xq, wq.T, scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16),
                        2 * a.tokens * n * k,
                    ),
                }
            )
    x = torch.randn(a.tokens, 4096, device=device, generator=g)
    for block in (32, 128):
        y = hadamard_transform(hadamard_transform(x, block), block)
        rows.append({"op": f"hadamard block {block}: ||H H x - x|| / ||x||", "rel_error": rel_err(y, x)})
    h = torch.randn(a.tokens, 576, device=device, generator=g)
    head = torch.randn(49152, 576, device=device, generator=g) * 0.02
    y = torch.randint(0, 49152, (a.tokens,), device=device, generator=g)
    naive = F.cross_entropy(h @ head.T, y, reduction="sum")
    rows.append(
        {
            "op": "linear_cross_entropy loss (vocab 49152)",
            "rel_error": abs(float(linear_cross_entropy(h, head, y)) - float(naive)) / float(naive),
        }
    )
    if device.type == "cuda":
        for name, fn in (
            ("naive logits + F.cross_entropy", lambda: F.cross_entropy(h @ head.T, y)),
            ("linear_cross_entropy", lambda: linear_cross_entropy(h, head, y, reduction="mean")),
        ):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            rows.append({"op": f"loss memory: {name}", "peak_extra_bytes": torch.cuda.max_memory_allocated() - base})
    print(f"device: {device}, tokens per matmul: {a.tokens}")
    print("| op | shape | relative error | TFLOP/s |")
    print("|---|---|---|---|")
    for r in rows:
        err = f"{r['rel_error']:.2e}" if "rel_error" in r else "-"
        speed = f"{r['tflops']:.1f}" if "tflops" in r else "-"
        extra = f" (peak +{r['peak_extra_bytes'] / 2**20:.0f} MiB)" if "peak_extra_bytes" in r else ""
        print(f"| {r['op']}{extra} | {r.get('shape', '-')} | {err} | {speed} |")
    if device.type != "cuda":
        print(
            "speed: needs a CUDA GPU (these CPU figures use the torch references; the Triton kernels are "
            "checked against them under TRITON_INTERPRET=1 in tests/kernels)"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"device": str(device), "tokens": a.tokens, "rows": rows}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
