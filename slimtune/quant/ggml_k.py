"""llama.cpp's K block types q4_k and q6_k: super-blocks of 256 values along a row, each cut into sub-blocks
whose scales are themselves quantized against the super-block's fp16 scale (ggml-quants.c's reference
quantizers, `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref`, written out in torch over every block at once).

    q4_k  8 sub-blocks of 32: v ~= d * sc_j * q - dmin * m_j, q in 0..15, sc_j / m_j 6 bits,  144 bytes
          (d, dmin fp16; 12 bytes of packed sc / m; 128 bytes of nibbles). Each sub-block's (scale, min) comes
          from make_qkx2_quants: a weighted least-squares fit over 21 candidate grids (weights av|x| + |x|).
    q6_k  16 sub-blocks of 16: v ~= d * sc_j * (q - 32), q in 0..63, sc_j int8,                 210 bytes
          (128 bytes of low nibbles, 64 of high 2 bits, 16 int8 scales, d fp16). Each sub-block's scale comes
          from make_qx_quants: the best of 19 grids by x^2-weighted fit.

Sums run in the reference's order (a sequential scan, fp32), roundings are ggml's nearest_int (half to even);
the `gguf` package's dequantizer reads these bytes to the values `dequantize_k` gives (tests/quant/test_ggml.py).
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
K_TYPES = {"q4_k": 144, "q6_k": 210}  # bytes per super-block of 256
GROUP_MAX_EPS = 1e-15


def _f32(x: float) -> torch.Tensor:
    """A float32 scalar: `c / t` with a Python number c is c * (1 / t) in torch, not the reference's division."""
    return torch.tensor(np.float32(x))


def _seq_sum(x: torch.Tensor) -> torch.Tensor:
    """Sums over dim 1 in the reference's order: one fp32 add after the other (torch's own sums are pairwise, and
    its cumsum accumulates in double on CPU)."""
    columns = x.movedim(1, 0).contiguous()
    total = columns[0].clone()
    for column in columns[1:]:
        total += column
    return total


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """The fp32 value an fp16 field stores."""
    return x.to(torch.float16).float()


def _qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants on rows of x (n, 32) with weights w: (scale (n,), the_min (n,), L (n, 32) int)."""
    lo = first = x.amin(dim=1).clamp(max=0)
    hi = x.amax(dim=1)
    flat = hi == lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)[:, None]
    sum_w, sum_x = _seq_sum(w), _seq_sum(w * x)
    iscale = _f32(nmax) / span
    scale = (_f32(1) / iscale)[:, 0]
    L = torch.round(iscale * (x - lo[:, None])).clamp(0, nmax)
    best = _seq_sum(w * (scale[:, None] * L + lo[:, None] - x) ** 2)
    for step in range(nstep + 1):
        # the reference's search moves `min` to each better fit's and takes the next grid from there
        span = torch.where(flat, torch.ones_like(hi), hi - lo)[:, None]
        grid = _f32(rmin) + _f32(rdelta) * step + nmax
        La = torch.round(grid / span * (x - lo[:, None])).clamp(0, nmax)
        wl = w * La
        sum_l, sum_l2, sum_xl = _seq_sum(torch.stack([wl, wl * La, wl * x], dim=2)).unbind(1)
        D = sum_w * sum_l2 - sum_l * sum_l
        safe = torch.where(D > 0, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        clipped = this_min > 0
        this_scale = torch.where(clipped, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), this_scale)
        this_min = torch.where(clipped, torch.zeros_like(this_min), this_min)
        mad = _seq_sum(w * (this_scale[:, None] * La + this_min[:, None] - x) ** 2)
        better = (D > 0) & (mad < best)
        L = torch.where(better[:, None], La, L)
        best = torch.where(better, mad, best)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    return torch.where(flat, torch.zeros_like(scale), scale), -torch.where(flat, first, lo), L.long()


def _pack_scales_q4k(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """(nb, 8) 6-bit scales and mins -> (nb, 12) bytes, as get_scale_min_k4 reads them."""
    out = torch.zeros(ls.shape[0], 12, dtype=torch.long)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out.to(torch.uint8)


def _unpack_scales_q4k(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = raw.long()
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def _quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """(nb, 256) fp32 -> (nb, 144) uint8."""
    nb = x.shape[0]
    sub = x.reshape(-1, 32)
    av_x = torch.sqrt((_seq_sum(sub * sub) / 32).double()).float()  # sqrtf, correctly rounded (torch's fp32 is not)
    weights = av_x[:, None] + sub.abs()
    scales, mins, L = _qkx2(sub, weights, 15, -1.0, 0.1, 20)
    scales, mins, L = scales.view(nb, 8), mins.view(nb, 8), L.view(nb, 256)
    # + 0: a maximum of -0.0 stores as +0.0 (the reference starts its maxima at 0 and keeps it)
    max_scale, max_min = scales.amax(dim=1).clamp(min=0) + 0, mins.amax(dim=1).clamp(min=0) + 0
    inv_scale = torch.where(max_scale > 0, _f32(63) / torch.where(max_scale > 0, max_scale, 1), 0)
    inv_min = torch.where(max_min > 0, _f32(63) / torch.where(max_min > 0, max_min, 1), 0)
    ls = torch.round(inv_scale[:, None] * scales).clamp(0, 63).long()
    lm = torch.round(inv_min[:, None] * mins).clamp(0, 63).long()
    d, dmin = _fp16(max_scale / 63), _fp16(max_min / 63)
    ds = (d[:, None] * ls).repeat_interleave(32, dim=1)
    dm = (dmin[:, None] * lm).repeat_interleave(32, dim=1)
    # a sub-block whose scale stores as 0 keeps make_qkx2_quants' codes, as the reference does
    fresh = torch.round((x + dm) / torch.where(ds != 0, ds, 1)).clamp(0, 15).long()
    L = torch.where(ds != 0, fresh, L)
    chunks = L.view(nb, 4, 2, 32)
    qs = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(nb, 128).to(torch.uint8)
    head = torch.stack([d, dmin], dim=1).to(torch.float16).view(torch.uint8).view(nb, 4)
    return torch.cat([head, _pack_scales_q4k(ls, lm), qs], dim=1)


def _dequantize_q4_k(raw: torch.Tensor) -> torch.Tensor:
    nb = raw.shape[0]
    d = raw[:, 0:2].contiguous().view(torch.float16).float()
    dmin = raw[:, 2:4].contiguous().view(torch.float16).float()
    sc, m = _unpack_scales_q4k(raw[:, 4:16])
    qs = raw[:, 16:].long().view(nb, 4, 32)
    q = torch.stack([qs & 0xF, qs >> 4], dim=2).reshape(nb, 8, 32)
    return ((d * sc)[:, :, None] * q - (dmin * m)[:, :, None]).reshape(nb, 256)


def _qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1) on rows of x: (scale (n,), L (n, k) in 0..2 nmax - 1)."""
    idx = x.abs().argmax(dim=1, keepdim=True)  # the first of equal magnitudes, as the reference's strict >
    top = x.gather(1, idx)[:, 0]
    zero = top.abs() < GROUP_MAX_EPS
    top = torch.where(zero, torch.ones_like(top), top)
    w = x * x

    def fit(grid: torch.Tensor):
        iscale = -grid / top
        ell = torch.round(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return _seq_sum(w * x * ell), _seq_sum(w * ell * ell), ell

    sumlx, suml2, ell = fit(torch.tensor(float(nmax)))
    scale = sumlx / suml2
    best, L = scale * sumlx, ell
    for step in [*range(-9, 0), *range(1, 10)]:
        sumlx, suml2, ell = fit(nmax + _f32(0.1) * step)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, 1), scale)
        best = torch.where(better, scale * sumlx, best)
        L = torch.where(better[:, None], ell, L)
    L = torch.where(zero[:, None], torch.full_like(L, -nmax), L)
    return torch.where(zero, torch.zeros_like(scale), scale), (L + nmax).long()


def _quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    """(nb, 256) fp32 -> (nb, 210) uint8."""
    nb = x.shape[0]
    scales, L = _qx(x.reshape(-1, 16), 32)
    scales, L = scales.view(nb, 16), L.view(nb, 256)
    idx = scales.abs().argmax(dim=1, keepdim=True)
    max_scale = scales.gather(1, idx)[:, 0]
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = _f32(-128) / torch.where(empty, torch.ones_like(max_scale), max_scale)
    d = _fp16(_f32(1) / iscale)
    sc = torch.round(iscale[:, None] * scales).clamp(max=127).long()
    ds = (d[:, None] * sc).repeat_interleave(16, dim=1)
    fresh = torch.round(x / torch.where(ds != 0, ds, 1)).clamp(-32, 31).long() + 32
    L = torch.where(ds != 0, fresh, L)
    c = L.view(nb, 2, 4, 32)  # two halves of 128, four quarters of 32
    ql = torch.cat([c[:, :, 0] & 0xF | (c[:, :, 2] & 0xF) << 4, c[:, :, 1] & 0xF | (c[:, :, 3] & 0xF) << 4], dim=2)
    qh = (c[:, :, 0] >> 4) | (c[:, :, 1] >> 4) << 2 | (c[:, :, 2] >> 4) << 4 | (c[:, :, 3] >> 4) << 6
    head = [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.to(torch.int8).view(torch.uint8).long()]
    out = torch.cat([*head, d.to(torch.float16).view(torch.uint8).view(nb, 2).long()], dim=1).to(torch.uint8)
    return torch.where(empty[:, None], torch.zeros_like(out), out)


def _dequantize_q6_k(raw: torch.Tensor) -> torch.Tensor:
    nb = raw.shape[0]
    ql = raw[:, :128].long().view(nb, 2, 2, 32)
    qh = raw[:, 128:192].long().view(nb, 2, 32)
    sc = raw[:, 192:208].contiguous().view(torch.int8).float()
    d = raw[:, 208:210].contiguous().view(torch.float16).float()
    low = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
    high = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2)
    q = (low | (high << 4)) - 32  # (nb, 2, 4, 32)
    return ((d * sc).repeat_interleave(16, dim=1) * q.reshape(nb, 256).float()).reshape(nb, 256)


def quantize_k(x: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """(nb, 256) fp32 super-blocks -> (nb, bytes) uint8 in `ggml_type` (q4_k / q6_k)."""
    return _quantize_q4_k(x) if ggml_type == "q4_k" else _quantize_q6_k(x)


def dequantize_k(raw: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """(nb, bytes) uint8 -> (nb, 256) fp32."""
    return _dequantize_q4_k(raw) if ggml_type == "q4_k" else _dequantize_q6_k(raw)
