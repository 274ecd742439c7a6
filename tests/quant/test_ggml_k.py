"""llama.cpp's K types (quant/ggml_k.py, through quant/ggml.py) against ggml-quants.c's reference quantizers
written out here value by value in numpy float32 (`quantize_row_q4_K_ref`, `quantize_row_q6_K_ref`: the same
bytes) and the `gguf` package's dequantizer (the same values); rows that are not whole 256-value blocks fall back
to q5_0 / q8_0 as llama.cpp's quantizer does; as a quantized base and as a QAT grid."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from slimtune.quant import quantize_ggml
from slimtune.quant.fake import QuantFormatSpec
from slimtune.quant.ggml import GGMLFormat, GGMLLinear

f32 = np.float32


def nearest_int(v) -> int:
    return int(np.round(f32(v)))  # ggml's nearest_int: round half to even in fp32


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    lo, hi = x[0], x[0]
    sum_w, sum_x = w[0], f32(w[0] * x[0])
    for i in range(1, len(x)):
        lo, hi = min(lo, x[i]), max(hi, x[i])
        sum_w, sum_x = f32(sum_w + w[i]), f32(sum_x + f32(w[i] * x[i]))
    lo = min(lo, f32(0))
    if hi == lo:
        return f32(0), -lo, [0] * len(x)
    iscale = f32(f32(nmax) / f32(hi - lo))
    scale = f32(f32(1) / iscale)
    L = [max(0, min(nmax, nearest_int(f32(iscale * f32(v - lo))))) for v in x]
    best = f32(0)
    for i, v in enumerate(x):
        diff = f32(f32(f32(scale * f32(L[i])) + lo) - v)
        best = f32(best + f32(w[i] * f32(diff * diff)))
    for step in range(nstep + 1):
        iscale = f32(f32(f32(f32(rmin) + f32(f32(rdelta) * f32(step))) + f32(nmax)) / f32(hi - lo))
        La = [max(0, min(nmax, nearest_int(f32(iscale * f32(v - lo))))) for v in x]
        sl = sl2 = sxl = f32(0)
        for i, v in enumerate(x):
            wl = f32(w[i] * f32(La[i]))
            sl, sl2, sxl = f32(sl + wl), f32(sl2 + f32(wl * f32(La[i]))), f32(sxl + f32(wl * v))
        D = f32(f32(sum_w * sl2) - f32(sl * sl))
        if D > 0:
            this_scale = f32(f32(f32(sum_w * sxl) - f32(sum_x * sl)) / D)
            this_min = f32(f32(f32(sl2 * sum_x) - f32(sl * sxl)) / D)
            if this_min > 0:
                this_min, this_scale = f32(0), f32(sxl / sl2)
            mad = f32(0)
            for i, v in enumerate(x):
                diff = f32(f32(f32(this_scale * f32(La[i])) + this_min) - v)
                mad = f32(mad + f32(w[i] * f32(diff * diff)))
            if mad < best:
                L, best, scale, lo = La, mad, this_scale, this_min
    return scale, f32(-lo), L


def reference_q4_k(x) -> bytes:
    scales, mins, L = [], [], []
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        sum_x2 = f32(0)
        for v in xs:
            sum_x2 = f32(sum_x2 + f32(v * v))
        av_x = f32(np.sqrt(f32(sum_x2 / f32(32))))
        w = [f32(av_x + abs(v)) for v in xs]
        s, m, ell = make_qkx2_quants(xs, w, 15, -1.0, 0.1, 20)
        scales.append(s), mins.append(m), L.extend(ell)
    max_scale, max_min = f32(0), f32(0)
    for s, m in zip(scales, mins):
        max_scale, max_min = (s if s > max_scale else max_scale), (m if m > max_min else max_min)
    inv_scale = f32(f32(63) / max_scale) if max_scale > 0 else f32(0)
    inv_min = f32(f32(63) / max_min) if max_min > 0 else f32(0)
    sc = [0] * 12
    for j in range(8):
        ls, lm = min(63, nearest_int(f32(inv_scale * scales[j]))), min(63, nearest_int(f32(inv_min * mins[j])))
        if j < 4:
            sc[j], sc[j + 4] = ls, lm
        else:
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sc[j - 4] |= (ls >> 4) << 6
            sc[j] |= (lm >> 4) << 6
    d, dmin = np.float16(max_scale / f32(63)), np.float16(max_min / f32(63))
    for j in range(8):
        s = sc[j] & 63 if j < 4 else (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)
        m = sc[j + 4] & 63 if j < 4 else (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
        dj = f32(f32(d) * f32(s))
        if not dj:
            continue
        dm = f32(f32(dmin) * f32(m))
        for i in range(32):
            L[32 * j + i] = max(0, min(15, nearest_int(f32(f32(x[32 * j + i] + dm) / dj))))
    qs = [L[c + i] | (L[c + i + 32] << 4) for c in range(0, 256, 64) for i in range(32)]
    return d.tobytes() + dmin.tobytes() + bytes(sc) + bytes(qs)


def make_qx_quants(x, nmax) -> float:
    amax, top = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, top = abs(v), v
    if amax < 1e-15:
        return f32(0)

    def fit(iscale):
        sumlx = suml2 = f32(0)
        for v in x:
            ell = f32(max(-nmax, min(nmax - 1, nearest_int(f32(iscale * v)))))
            w = f32(v * v)
            sumlx, suml2 = f32(sumlx + f32(f32(w * v) * ell)), f32(suml2 + f32(f32(w * ell) * ell))
        return sumlx, suml2

    sumlx, suml2 = fit(f32(f32(-nmax) / top))
    scale = f32(sumlx / suml2)
    best = f32(scale * sumlx)
    for step in [*range(-9, 0), *range(1, 10)]:
        sumlx, suml2 = fit(f32(-f32(f32(nmax) + f32(f32(0.1) * f32(step))) / top))
        if suml2 > 0 and f32(sumlx * sumlx) > f32(best * suml2):
            scale = f32(sumlx / suml2)
            best = f32(scale * sumlx)
    return scale


def reference_q6_k(x) -> bytes:
    scales = [make_qx_quants(x[16 * j : 16 * j + 16], 32) for j in range(16)]
    top, amax = f32(0), f32(0)
    for s in scales:
        if abs(s) > amax:
            amax, top = abs(s), s
    if amax < 1e-15:
        return bytes(210)
    iscale = f32(f32(-128) / top)
    d = np.float16(f32(1) / iscale)
    sc = [min(127, nearest_int(f32(iscale * s))) for s in scales]
    L = [0] * 256
    for j in range(16):
        dj = f32(f32(d) * f32(sc[j]))
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, nearest_int(f32(x[16 * j + i] / dj)))) + 32 if dj else 0
    ql, qh = [0] * 128, [0] * 64
    for h in range(2):
        b = 128 * h
        for i in range(32):
            ql[64 * h + i] = (L[b + i] & 0xF) | ((L[b + i + 64] & 0xF) << 4)
            ql[64 * h + i + 32] = (L[b + i + 32] & 0xF) | ((L[b + i + 96] & 0xF) << 4)
            qh[32 * h + i] = sum((L[b + i + 32 * k] >> 4) << (2 * k) for k in range(4))
    return bytes(ql) + bytes(qh) + np.array(sc, dtype=np.int8).tobytes() + d.tobytes()


def _blocks() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(8, 256) * torch.tensor([1e-3, 1e-2, 0.1, 1, 3, 0.05, 0.5, 2])[:, None]
    x[1, :32] = 0  # an all-zero sub-block
    x[2] = 0.5  # a constant super-block
    x[3] = torch.tensor([1.0, -1.0] * 128)  # ties in magnitude
    x[4, :128] = 0
    x[5] = x[5].abs()  # no negative value: the min clamps to 0
    return x.to(torch.bfloat16).float()  # bf16 values, as a model's weights: many exact ties


@pytest.mark.parametrize("ggml_type, reference", [("q4_k", reference_q4_k), ("q6_k", reference_q6_k)])
def test_k_types_equal_the_reference_bytes_and_the_gguf_values(ggml_type, reference):
    x = torch.cat([_blocks(), torch.zeros(1, 256), torch.randn(1, 256)])
    ours = quantize_ggml(x.view(-1, 512), GGMLFormat(ggml_type))
    want = b"".join(reference(row.numpy()) for row in x)
    assert ours.blocks.numpy().tobytes() == want
    kind = getattr(GGMLQuantizationType, ggml_type.upper())
    values = quants.dequantize(ours.blocks.numpy().reshape(x.shape[0], -1), kind)
    assert torch.equal(ours.dequantize().view(x.shape), torch.from_numpy(values))
    assert torch.equal(ours.dequantize().view(x.shape)[-2], torch.zeros(256))
    assert ours.nbytes * 8 / x.numel() == GGMLFormat(ggml_type).bits_per_param((5, 512))


@pytest.mark.parametrize("ggml_type, fallback", [("q4_k", "q5_0"), ("q6_k", "q8_0")])
def test_rows_of_partial_blocks_fall_back_as_llama_cpp_does(ggml_type, fallback):
    w = torch.randn(6, 576)
    fmt = GGMLFormat(ggml_type)
    assert fmt.stored_type(w.shape) == fallback and fmt.stored_type((6, 1536)) == ggml_type
    ours = quantize_ggml(w, fmt)
    ref = quants.quantize(w.numpy(), getattr(GGMLQuantizationType, fallback.upper()))
    assert np.array_equal(ours.blocks.numpy().reshape(ref.shape), ref)
    assert fmt.bits_per_param(w.shape) == GGMLFormat(fallback).bits_per_param(w.shape)


def test_a_k_type_linear_and_its_fake_quantization_use_the_same_codes():
    torch.manual_seed(1)
    lin = torch.nn.Linear(512, 8)
    q = GGMLLinear.quantize_linear(lin, GGMLLinear.format_for("q4_k"))
    ref = torch.from_numpy(
        quants.dequantize(
            np.frombuffer(b"".join(reference_q4_k(r) for r in lin.weight.detach().view(-1, 256).numpy()), np.uint8)
            .reshape(8, -1)
            .copy(),
            GGMLQuantizationType.Q4_K,
        )
    )
    x = torch.randn(3, 512)
    assert torch.equal(q(x), torch.nn.functional.linear(x, ref, lin.bias))
    assert torch.equal(QuantFormatSpec("q4_k").round_trip(lin.weight.detach()), ref)
