"""What the platform adds to the tensors: the process's libraries and the allocator, on CPU or CUDA.

CPU (peak RSS, report.json's cpu_peak_rss). Measured on this project's 2-core x86_64 CPU machine (torch 2.13 CPU,
transformers 5.x, glibc malloc) with `python benchmarks/plan_accuracy.py --calibrate`, whose configurations
are not the ones the accuracy table reports (benchmarks/results/plan_accuracy.json, "calibration"):
  LIBRARY_RSS      the process before the model loads: torch, transformers, slimtune's trainer imported, the
                   pydoc data tokenized: the three tiny-llama calibration runs' peak RSS (whose tensors are a few
                   MB) minus everything else predicted: 465, 476 and 467 MiB, the mean
  TOKENIZER_RSS_PER_BYTE  the fast tokenizer in memory per byte of its files: SmolLM2's 3.5 MB tokenizer.json
                   adds 22 MiB at the start of model loading (VmRSS, SmolLM2 vs tiny-llama runs)
  MMAP_MAX         glibc serves blocks under its mmap threshold (128 KiB, raised by frees up to 32 MiB) from
                   the heap, which keeps freed holes; bigger blocks are mapped and unmapped
  FRAGMENTATION    the heap's growth beyond the live bytes over a training step, as factors of the heap-sized
                   activations one step allocates for backward (what it would save without checkpointing: the
                   churn, whether or not they are kept) and of the dense weights a quantized base dequantizes
                   at each use. bf16: least squares of measured peak minus the predicted live bytes over the six
                   SmolLM2 calibration runs (within -5%..+5% with it). Refitted after the loaded file's pages were
                   released, the heap trimmed after loading and NF4 decoded by one gather (a qlora run with
                   checkpointing added to the set): the dequantization term came out -0.008, used as 0; fp32: the
                   peak RSS with glibc's
                   defaults minus the same run's with MALLOC_MMAP_THRESHOLD_=131072 (every tensor mapped, RSS ~
                   live bytes) on SmolLM2 LoRA (4 x 256 tokens: 0.80 x) and QLoRA (2 x 128: 0.86 x), the mean
                   (fp32 runs show no dequantization term). Gradients add nothing measurable (a least-squares
                   factor of -0.06..-0.1)
  RUNTIME_RSS      growth by the first training step that no tensor explains (allocator arenas, OpenMP
                   threads, oneDNN caches): tiny-llama's VmRSS went from 454 MiB at the start of model loading to
                   a 505 MiB peak in its first step; kept apart from LIBRARY_RSS so the load phase excludes it
CUDA (what nvidia-smi shows): the CUDA context and kernels (~500 MiB on recent GPUs with torch's kernels loaded
lazily) and the caching allocator's reserve above the allocated peak (block rounding, segments kept for reuse,
~10%). No GPU was available to calibrate these two: they are the commonly reported figures.
"""

from __future__ import annotations

import importlib.util

MiB = 2**20

LIBRARY_RSS = 400 * MiB
# torch._dynamo (which transformers imports while building a model) imports triton whenever it is installed:
# a tiny-llama LoRA run (1 step, fp32, the plan test's) peaked at 452.4 / 452.6 MiB with triton hidden and
# 523.5 / 523.7 MiB with it (this code and the previous commit's alike), against 52 MiB of predicted tensors.
# LIBRARY_RSS + TRITON_RSS = 471 MiB, what the SmolLM2 calibration's 469 MiB was (measured with triton)
TRITON_RSS = 71 * MiB
TOKENIZER_RSS_PER_BYTE = 6.5
RUNTIME_RSS = 46 * MiB
MMAP_MAX = 32 * MiB
# model.dtype -> (x the heap-sized activations of a step without checkpointing, x a quantized base's
# heap-sized dequantized weights)
FRAGMENTATION = {"bfloat16": (0.372, 0.0), "float32": (0.83, 0.0)}


def library_rss() -> int:
    """LIBRARY_RSS, plus triton's import where it is installed (see TRITON_RSS)."""
    return LIBRARY_RSS + (TRITON_RSS if importlib.util.find_spec("triton") is not None else 0)


CUDA_CONTEXT = 500 * MiB
CUDA_ALLOCATOR_SLACK = 0.10
