"""Packed low-bit formats: names, exact storage, error bounds, double quantization, PackedLinear."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtune.quant import (
    PACKED_METHODS,
    Int8Linear,
    NF4Linear,
    PackedLinear,
    PackedWeight,
    QuantFormat,
    bits_per_param,
    dequantize_weight,
    is_quantized_linear,
    quantize_int8,
    quantize_model,
    quantize_nf4,
    quantize_packed,
)
from slimtune.quant.nfk import nf_codebook
from slimtune.quant.scales import DQ_BLOCK, double_dequantize, double_quantize

FORMATS = ["nf2", "nf3", "nf4", *(f"int{k}" for k in range(2, 9)), *(f"int{k}a" for k in range(2, 9))]
LINEAR_FORMATS = ["nf3", "nf2-b32-dq", "int4a-b128", "int5-b64-dq", "int3a-b32-dq", "int7a-b64"]


def unit_grid(fmt: QuantFormat) -> torch.Tensor:
    """The format's levels before scaling: NF codebook, -qmax..qmax, or 0..2**bits-1."""
    if fmt.kind == "nf":
        return nf_codebook(fmt.bits)
    if fmt.kind == "int":
        qmax = 2 ** (fmt.bits - 1) - 1
        return torch.arange(-qmax, qmax + 1).float()
    return torch.arange(2**fmt.bits).float()


def dq_error_bound(v: torch.Tensor) -> torch.Tensor:
    """Per-value bound of double quantization: half an int8 step, max|v - mean| / 254 of its 256-block."""
    c = v - v.mean()
    pad = -c.numel() % DQ_BLOCK
    spread = F.pad(c.abs(), (0, pad)).view(-1, DQ_BLOCK).amax(dim=1)
    return (spread / 254 * (1 + 1e-4)).repeat_interleave(DQ_BLOCK)[: v.numel()] + 1e-7 * v.abs().max()


# -- QuantFormat


def test_names_roundtrip():
    for kind, prefix, suffix in [("nf", "nf", ""), ("int", "int", ""), ("int_asym", "int", "a")]:
        for bits in range(2, 9):
            for block in (32, 64, 100, 256):
                for dq in (False, True):
                    fmt = QuantFormat(kind, bits, block, dq)
                    assert fmt.name == f"{prefix}{bits}{suffix}-b{block}" + ("-dq" if dq else "")
                    assert QuantFormat.parse(fmt.name) == fmt


def test_parse_short_names_and_overrides():
    assert QuantFormat.parse("nf3") == QuantFormat("nf", 3, 64, False)
    assert QuantFormat.parse("int4") == QuantFormat("int", 4, 64, False)
    assert QuantFormat.parse("int4a") == QuantFormat("int_asym", 4, 64, False)
    assert QuantFormat.parse("nf3", block_size=128, double_quant=True).name == "nf3-b128-dq"
    assert QuantFormat.parse("nf3-b32-dq", double_quant=False).name == "nf3-b32"
    assert QuantFormat.parse(QuantFormat("nf", 2), block_size=32).name == "nf2-b32"


@pytest.mark.parametrize(
    "name", ["nf1", "nf9", "int1", "int9", "int1a", "nf3a", "fp4", "", "nf3-b0", "nf3-dq-b64", "int4-b64-dq-x"]
)
def test_invalid_names(name):
    with pytest.raises(ValueError, match="valid"):
        QuantFormat.parse(name)


def test_invalid_fields():
    with pytest.raises(ValueError, match="valid: nf, int, int_asym"):
        QuantFormat("fp", 4)
    with pytest.raises(ValueError, match="block_size"):
        QuantFormat("nf", 3, 0)
    with pytest.raises(ValueError, match="bits"):
        QuantFormat("int_asym", 1)
    with pytest.raises(ValueError, match="divisible by block_size=64"):
        QuantFormat("nf", 3).bits_per_param((10, 10))


# -- storage


def test_bits_per_param_hand_computed():
    # nf3, blocks of 64: 3 bits per code + one fp32 absmax per 64 values = 3 + 32/64
    assert QuantFormat.parse("nf3").bits_per_param((64, 64)) == 3.5
    # + dq, 4096 values: 1536 code bytes, 64 int8 scales, ceil(64/256) = 1 fp32 block scale, 1 fp32 mean
    # = 1608 bytes = 12864 bits -> 12864 / 4096 = 3.140625
    assert QuantFormat.parse("nf3-b64-dq").bits_per_param((64, 64)) == 12864 / 4096
    # int4a, blocks of 128: 4 bits + fp32 scale and fp32 zero per 128 values = 4 + 64/128
    assert QuantFormat.parse("int4a-b128").bits_per_param((64, 128)) == 4.5
    # ragged: nf3 blocks of 7 on (3, 7): 63 code bits -> 8 bytes (one padding bit) + 3 fp32 = 20 bytes
    assert QuantFormat.parse("nf3-b7").bits_per_param((3, 7)) == 160 / 21
    # int5a blocks of 10 on (2, 5): 50 code bits -> 7 bytes (6 padding bits) + fp32 scale + fp32 zero
    assert QuantFormat.parse("int5a-b10").bits_per_param((2, 5)) == 15 * 8 / 10


@pytest.mark.parametrize("name", ["nf2", "nf3", "nf4", "int3", "int4a", "int6a", "int8"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 64), (3, 7 * 64), (512, 320)])
def test_bits_per_param_matches_quantized(name, double_quant, shape):
    fmt = QuantFormat.parse(name, double_quant=double_quant)
    packed = quantize_packed(torch.randn(shape), fmt)
    assert fmt.bits_per_param(shape) == packed.bits_per_param == bits_per_param(packed)
    assert packed.nbytes == sum(t.numel() * t.element_size() for t in packed.tensors().values())


def test_bits_per_param_of_other_weights_and_modules():
    w = torch.randn(64, 128)
    assert bits_per_param(quantize_nf4(w, 64, double_quant=False)) == 4.5
    assert bits_per_param(quantize_int8(w, 64)) == 8.5
    assert bits_per_param(NF4Linear.from_linear(nn.Linear(128, 64), double_quant=False)) == 4.5  # bias excluded
    assert bits_per_param(PackedLinear.from_linear(nn.Linear(128, 64), "int4a-b128")) == 4.5
    with pytest.raises(TypeError):
        bits_per_param(nn.Linear(4, 4))


# -- accuracy


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("block", [32, 64, 128, 256])
@pytest.mark.parametrize("double_quant", [False, True])
def test_error_within_half_grid_gap(name, block, double_quant):
    fmt = QuantFormat.parse(name, block_size=block, double_quant=double_quant)
    torch.manual_seed(block)
    w = torch.randn(64, 1024) * 0.02
    w[0, :block] = 0.0  # all-zero block
    w[1, :block] += 0.1  # off-centre block
    packed = quantize_packed(w, fmt)
    blocks = w.reshape(-1, block)
    lo, hi, absmax = blocks.amin(dim=1), blocks.amax(dim=1), blocks.abs().amax(dim=1)
    grid = unit_grid(fmt)
    step = {"nf": absmax, "int": absmax / grid.max(), "int_asym": (hi - lo) / grid.max()}[fmt.kind]
    bound = step * (grid[1:] - grid[:-1]).max() / 2 + 1e-6 * absmax  # half the largest gap + fp32
    if double_quant:  # the stored scale (and zero) come back off by up to half an int8 step
        bound = bound + grid.abs().max() * dq_error_bound(step)
        if fmt.kind == "int_asym":
            bound = bound + dq_error_bound(lo)
    err = (blocks - packed.dequantize().view(-1, block)).abs()
    assert (err <= bound[:, None]).all(), float((err - bound[:, None]).max())
    if not (fmt.kind == "int_asym" and double_quant):  # 0 is a grid point (asym + dq: zero is int8-rounded)
        assert (packed.dequantize()[0, :block] == 0).all()


@pytest.mark.parametrize("name", ["nf3", "int4", "int4a"])
def test_non_finite_rejected(name):
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = torch.randn(4, 64)
        w[2, 5] = bad
        with pytest.raises(ValueError, match="non-finite"):
            quantize_packed(w, name)


@pytest.mark.parametrize("n", [1, 255, 256, 1000])
def test_double_quantize_bound(n):
    torch.manual_seed(n)
    v = torch.rand(n) * 0.1 + 0.01
    d = double_quantize(v, "zero")
    assert set(d) == {"zero_q", "zero_scale", "zero_offset"} and d["zero_q"].dtype == torch.int8
    assert (
        d["zero_q"].shape == (n,) and d["zero_scale"].shape == (-(-n // DQ_BLOCK),) and d["zero_offset"].shape == (1,)
    )
    back = double_dequantize(d["zero_q"], d["zero_scale"], d["zero_offset"])
    assert ((back - v).abs() <= dq_error_bound(v)).all()


# -- PackedWeight tensors


@pytest.mark.parametrize("name", ["nf3-b64", "nf3-b64-dq", "int4a-b32", "int4a-b32-dq", "int6-b128-dq"])
def test_tensors_roundtrip(name):
    w = torch.randn(32, 128)
    packed = quantize_packed(w, name)
    names = {
        "nf3-b64": ["codes", "scale"],
        "nf3-b64-dq": ["codes", "scale_q", "scale_scale", "scale_offset"],
        "int4a-b32": ["codes", "scale", "zero"],
        "int4a-b32-dq": ["codes", "scale_q", "scale_scale", "scale_offset", "zero_q", "zero_scale", "zero_offset"],
        "int6-b128-dq": ["codes", "scale_q", "scale_scale", "scale_offset"],
    }[name]
    assert list(packed.tensors()) == names
    back = PackedWeight.from_tensors({k: t.clone() for k, t in packed.tensors().items()}, name, (32, 128))
    assert torch.equal(back.dequantize(), packed.dequantize())


def test_from_tensors_names_the_bad_tensor():
    d = quantize_packed(torch.randn(32, 128), "int4a-b32").tensors()
    with pytest.raises(ValueError, match="'zero'"):
        PackedWeight.from_tensors({**d, "zero": d["zero"][:-1]}, "int4a-b32", (32, 128))
    with pytest.raises(ValueError, match="'codes'"):
        PackedWeight.from_tensors({**d, "codes": torch.zeros(3, dtype=torch.uint8)}, "int4a-b32", (32, 128))
    with pytest.raises(ValueError, match="'scale_q'.*missing"):
        PackedWeight.from_tensors(d, "int4a-b32-dq", (32, 128))


# -- PackedLinear


def make_linear(fmt, bias=True, seed=0):
    torch.manual_seed(seed)
    return PackedLinear.from_linear(nn.Linear(128, 96, bias=bias), fmt)


@pytest.mark.parametrize("fmt", LINEAR_FORMATS)
def test_forward_and_input_grad_match_dense(fmt):
    m = make_linear(fmt)
    assert m.format == QuantFormat.parse(fmt).name and m.block_size == QuantFormat.parse(fmt).block_size
    assert [n for n, _ in m.named_parameters()] == ["bias"] and not m.bias.requires_grad
    w = m.dequantize_weight()
    x = torch.randn(2, 5, 128, requires_grad=True)
    y = m(x)
    assert torch.equal(y, F.linear(x, w, m.bias))
    xr = x.detach().clone().requires_grad_(True)
    (y * torch.arange(96.0)).sum().backward()
    (F.linear(xr, w, m.bias) * torch.arange(96.0)).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_compute_dtype_bfloat16():
    torch.manual_seed(0)
    m = PackedLinear.from_linear(nn.Linear(64, 32), "nf3", compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    y = m(x)
    assert y.dtype == torch.float32
    ref = F.linear(x.bfloat16(), m.dequantize_weight(torch.bfloat16), m.bias).float()
    assert torch.equal(y, ref)


@pytest.mark.parametrize("fmt", LINEAR_FORMATS)
def test_state_dict_into_fresh_module(fmt):
    m = make_linear(fmt)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    fresh = PackedLinear(128, 96, bias=True, fmt=fmt)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), m(x))
    assert set(m.state_dict()) == {"bias", *quantize_packed(torch.randn(96, 128), fmt).tensors()}


@pytest.mark.parametrize("fmt", ["nf3-b64", "int4a-b32-dq"])
def test_to_bfloat16_keeps_scales(fmt):
    m = make_linear(fmt)
    before = {k: b.clone() for k, b in m.named_buffers()}
    m.to(torch.bfloat16)
    assert m.bias.dtype == torch.bfloat16
    for k, b in m.named_buffers():
        assert b.dtype == before[k].dtype and torch.equal(b, before[k]), k
    y = m(torch.randn(2, 128, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_requantize():
    m = make_linear("int3a-b64-dq")
    keys = {k: v.shape for k, v in m.state_dict().items()}
    new = torch.randn(96, 128)
    m.requantize_(new)
    assert torch.equal(m.dequantize_weight(), quantize_packed(new, "int3a-b64-dq").dequantize())
    assert {k: v.shape for k, v in m.state_dict().items()} == keys
    with pytest.raises(ValueError, match="shape"):
        m.requantize_(torch.randn(128, 96))


def test_from_packed_and_bad_shapes():
    torch.manual_seed(1)
    packed = quantize_packed(torch.randn(48, 64), "int4-b32")
    bias = torch.randn(48)
    m = PackedLinear.from_packed(packed, bias=bias)
    x = torch.randn(3, 64)
    assert torch.equal(m(x), F.linear(x, packed.dequantize(), bias))
    with pytest.raises(ValueError, match="2-D"):
        PackedLinear.from_packed(quantize_packed(torch.randn(4, 8, 64), "nf3"))
    with pytest.raises(ValueError, match="divisible by block_size=64"):
        PackedLinear(10, 10, fmt="nf3")


def test_quantize_model_nf3():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))
    dense = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    assert quantize_model(model, "nf3") == 3
    linears = [m for m in model if isinstance(m, PackedLinear)]
    assert len(linears) == 3 and all(m.format == "nf3-b64-dq" for m in linears)  # quantize_model: dq on
    for m, w in zip(linears, dense):
        assert is_quantized_linear(m)
        assert torch.equal(dequantize_weight(m), quantize_packed(w, "nf3-b64-dq").dequantize())
    assert model(torch.randn(2, 64)).shape == (2, 8)


def test_quant_formats_registry():
    """Every quant.method is one registered class; the config accepts exactly the registered names."""
    from slimtune.config import choices
    from slimtune.registry import QUANT_FORMATS

    assert set(PACKED_METHODS) == {"nf2", "nf3", *(f"int{k}" for k in range(2, 8)), *(f"int{k}a" for k in range(2, 9))}
    for name in PACKED_METHODS:
        model = nn.Sequential(nn.Linear(64, 32))
        quantize_model(model, name, block_size=32, double_quant=False)
        assert QUANT_FORMATS[name] is PackedLinear
        assert isinstance(model[0], PackedLinear) and model[0].fmt == QuantFormat.parse(name, block_size=32)
    for name, cls in (("nf4", NF4Linear), ("int8", Int8Linear)):
        model = nn.Sequential(nn.Linear(64, 32))
        quantize_model(model, name)
        assert QUANT_FORMATS[name] is cls and isinstance(model[0], cls)
    assert set(choices("quant.method")) == {"none", "lq_lora", *QUANT_FORMATS}
