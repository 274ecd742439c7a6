"""FP8 GEMM with per-tensor or per-row scales (the HALO / FP8-training matmul).

    out (M, N) = (a_fp8 * a_scale) @ (b_fp8 * b_scale).T      a (M, K), b (N, K), K-contiguous is fastest

`a_scale` is a scalar (per-tensor) or (M, 1) (per-row), `b_scale` a scalar or (N, 1) (one scale per
output column). Products accumulate in fp32 and the scales are applied once, in the epilogue, so
the K loop only moves fp8 tiles: half the bytes of a bf16 GEMM.

The Triton kernel feeds fp8 tiles straight to `tl.dot` where the tensor cores take them (NVIDIA
sm89+). Elsewhere (sm80 and older, ROCm) triton has no e4m3fn type, so the kernel loads the raw
bytes and decodes them to fp16 with shifts; fp16 holds every e4m3 and e5m2 value exactly, so both
paths give the same products. `torch._scaled_mm` (CUDA, sm89+) is the vendor kernel the tests
and benchmarks compare against.

Under TRITON_INTERPRET=1 the kernel runs one fixed small tile, and the fp8 path upcasts its tiles to
fp32 before `tl.dot` (INTERPRETER_FP32_DOT): the interpreter's own fp8 dot flushes e5m2 subnormals.
"""

from __future__ import annotations

import torch

from slimtune.kernels.dispatch import interpreting, triton_enabled, use_triton

if triton_enabled():
    import triton
    import triton.language as tl

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {fmt: torch.finfo(dtype).max for fmt, dtype in FP8_DTYPES.items()}  # 448, 57344
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# The Triton interpreter runs every program in numpy: one small tile keeps the tests fast.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4}


def quantize_fp8(x: torch.Tensor, fmt: str = "e4m3", axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (x_fp8 same shape, fp32 scale) with x ~= x_fp8.float() * scale.

    axis=None: one scale for the tensor, shape (). axis=-1: one scale per row, shape (..., 1).
    The scale maps each group's amax onto the format's largest value (448 for e4m3, 57344 for e5m2);
    rounding is to nearest even (torch's cast), after clamping so nothing overflows to NaN."""
    if fmt not in FP8_DTYPES:
        raise ValueError(f"fmt={fmt!r}: use one of {', '.join(FP8_DTYPES)}")
    if axis is not None and axis not in (-1, x.dim() - 1):
        raise ValueError(f"axis={axis!r}: use None (per-tensor) or -1 (per-row)")
    fp8_max = FP8_MAX[fmt]
    x32 = x.float()
    amax = x32.abs().amax() if axis is None else x32.abs().amax(dim=-1, keepdim=True)
    # An all-zero group gets the smallest normal scale: its values quantize to 0 either way.
    scale = (amax / fp8_max).clamp_min(torch.finfo(torch.float32).tiny)
    x_fp8 = (x32 / scale).clamp(-fp8_max, fp8_max).to(FP8_DTYPES[fmt])
    return x_fp8, scale


def dequantize_fp8(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_fp8` (up to its rounding)."""
    return (x_fp8.float() * scale).to(dtype)


def fp8_matmul_reference(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(a_fp8 * a_scale) @ (b_fp8 * b_scale).T in fp32, cast to out_dtype. a (M, K), b (N, K) -> (M, N)."""
    _check_inputs(a_fp8, a_scale, b_fp8, b_scale, out_dtype)
    a = a_fp8.float() * a_scale.float()
    b = b_fp8.float() * b_scale.float()
    return (a @ b.T).to(out_dtype)


def fp8_matmul(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Scaled FP8 GEMM: the Triton kernel on CUDA (or under TRITON_INTERPRET=1), else the reference."""
    if use_triton(a_fp8, b_fp8):
        return fp8_matmul_triton(a_fp8, a_scale, b_fp8, b_scale, out_dtype)
    return fp8_matmul_reference(a_fp8, a_scale, b_fp8, b_scale, out_dtype)


def _check_inputs(a_fp8, a_scale, b_fp8, b_scale, out_dtype) -> None:
    """Shapes and dtypes only (ValueError; nothing reads device memory, so nothing waits for the GPU)."""
    fp8 = tuple(FP8_DTYPES.values())
    if a_fp8.dtype not in fp8 or b_fp8.dtype not in fp8:
        raise ValueError(f"fp8_matmul: fp8 inputs expected, got {a_fp8.dtype} and {b_fp8.dtype}")
    if a_fp8.dim() != 2 or b_fp8.dim() != 2:
        raise ValueError(f"fp8_matmul: a (M, K) and b (N, K) expected, got {tuple(a_fp8.shape)}, {tuple(b_fp8.shape)}")
    if a_fp8.shape[1] != b_fp8.shape[1]:
        raise ValueError(f"fp8_matmul: K mismatch: a {tuple(a_fp8.shape)}, b {tuple(b_fp8.shape)}")
    for name, scale, rows in (("a_scale", a_scale, a_fp8.shape[0]), ("b_scale", b_scale, b_fp8.shape[0])):
        if scale.dtype != torch.float32:
            raise ValueError(f"fp8_matmul: {name} must be float32, got {scale.dtype}")
        if scale.numel() != 1 and tuple(scale.shape) != (rows, 1):
            raise ValueError(
                f"fp8_matmul: {name} must be per-tensor (one value) or per-row ({rows}, 1), got {tuple(scale.shape)}"
            )
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"fp8_matmul: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def native_fp8(device: torch.device) -> bool:
    """Whether triton kernels on `device` take e4m3fn/e5m2 tensors and fp8 `tl.dot`s: NVIDIA sm89 (Ada)
    and sm90+ (Hopper, Blackwell). The interpreter takes fp8 tensors too, so CPU tests run that path."""
    if device.type != "cuda":
        return interpreting()
    return torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul_triton(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    native_fp8_dot: bool | None = None,
) -> torch.Tensor:
    """Launch the Triton kernel. native_fp8_dot=None picks by device; False forces the byte-decode + fp16 dot."""
    _check_inputs(a_fp8, a_scale, b_fp8, b_scale, out_dtype)
    (M, K), N = a_fp8.shape, b_fp8.shape[0]
    out = torch.empty(M, N, device=a_fp8.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    if native_fp8_dot is None:
        native_fp8_dot = native_fp8(a_fp8.device)
    a_scale = a_scale.reshape(-1).contiguous()
    b_scale = b_scale.reshape(-1).contiguous()
    a_in, b_in = (a_fp8, b_fp8) if native_fp8_dot else (a_fp8.view(torch.uint8), b_fp8.view(torch.uint8))
    args = (a_in, b_in, a_scale, b_scale, out, M, N, K, *a_fp8.stride(), *b_fp8.stride(), *out.stride())
    flags = {
        "A_ROWWISE": a_scale.numel() != 1,
        "B_ROWWISE": b_scale.numel() != 1,
        "A_E5M2": a_fp8.dtype == torch.float8_e5m2,
        "B_E5M2": b_fp8.dtype == torch.float8_e5m2,
        "DECODE_FP16": not native_fp8_dot,
        "INTERPRETER_FP32_DOT": native_fp8_dot and interpreting(),
    }

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if interpreting():
        _fp8_matmul_kernel[grid](*args, **flags, **INTERPRETER_CONFIG)
    else:
        _fp8_matmul_kernel_autotuned[grid](*args, **flags)
    return out


if triton_enabled():

    @triton.jit
    def _fp8_bits_to_fp16(bits, IS_E5M2: tl.constexpr):
        """uint8 fp8 codes -> fp16, exactly. e5m2 is the top byte of an fp16. e4m3 (bias 7) moved into
        fp16 (bias 15) comes out 2^-8 too small, subnormals included; the epilogue multiplies by 256.
        The e4m3fn NaN code (0x7F) decodes to a finite value: quantize_fp8 never emits it."""
        bits = bits.to(tl.uint16)
        if IS_E5M2:
            half = bits << 8
        else:
            half = ((bits & 0x80) << 8) | ((bits & 0x7F) << 7)
        return half.to(tl.float16, bitcast=True)

    @triton.jit
    def _fp8_matmul_kernel(
        a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, out_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
        A_ROWWISE: tl.constexpr, B_ROWWISE: tl.constexpr, A_E5M2: tl.constexpr, B_E5M2: tl.constexpr,
        DECODE_FP16: tl.constexpr, INTERPRETER_FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        """One (BLOCK_M, BLOCK_N) output tile per program; K in BLOCK_K steps."""
        # Grouped launch order: GROUP_M row-tiles share each b column-tile while it sits in L2.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pids_per_group = GROUP_M * num_pid_n
        first_pid_m = (pid // pids_per_group) * GROUP_M
        group_rows = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % pids_per_group) % group_rows
        pid_n = (pid % pids_per_group) // group_rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Ragged M / N: wrap the row indices (the extra rows are computed but never stored), so only
        # the K tail needs a load mask. int64 offsets: M * K may pass 2^31.
        rows_a = (offs_m % M).to(tl.int64)
        rows_b = (offs_n % N).to(tl.int64)
        a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + rows_b[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            k_left = K - k_start
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if DECODE_FP16:  # a, b hold uint8 codes
                acc = tl.dot(_fp8_bits_to_fp16(a, A_E5M2), _fp8_bits_to_fp16(b, B_E5M2), acc)
            elif INTERPRETER_FP32_DOT:
                # The interpreter runs fp8 dots through its own fp8 -> fp16 cast, which flushes e5m2
                # subnormals; its fp8 -> fp32 cast is exact.
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
            else:
                # sm90 fp8 MMAs add into a reduced-precision accumulator; promoting into the fp32 `acc`
                # every BLOCK_K products keeps long-K sums accurate (DeepSeek-V3's fix, as in
                # torch._scaled_mm without use_fast_accum).
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        # Epilogue: out[m, n] = acc[m, n] * a_scale[m] * b_scale[n].
        if DECODE_FP16 and not A_E5M2:
            acc *= 256.0
        if DECODE_FP16 and not B_E5M2:
            acc *= 256.0
        if A_ROWWISE:
            acc *= tl.load(a_scale_ptr + rows_a)[:, None]
        else:
            acc *= tl.load(a_scale_ptr)
        if B_ROWWISE:
            acc *= tl.load(b_scale_ptr + rows_b)[None, :]
        else:
            acc *= tl.load(b_scale_ptr)
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    def _gpu_configs() -> list:
        """A handful of fp8 GEMM tiles (H100-sized down to small-M decode shapes)."""
        tiles = [
            (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4),
            (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (32, 64, 128, 4, 4),
            (16, 64, 256, 4, 4),
        ]  # fmt: skip
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
            for m, n, k, stages, warps in tiles
        ]

    _fp8_matmul_kernel_autotuned = triton.autotune(configs=_gpu_configs(), key=["M", "N", "K"])(_fp8_matmul_kernel)
