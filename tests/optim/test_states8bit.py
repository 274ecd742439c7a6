"""Block-wise 8-bit moments: round-trip error bounded by the map's local step, exact codes, storage, state API."""

import math

import pytest
import torch

from slimtune.optim import states8bit as S

NUMELS = [1, 255, 256, 257, 1000, 3 * 256]


def _reference_levels(signed):
    n, power = (127, 3) if signed else (255, 6)
    return (torch.arange(n + 1, dtype=torch.float64) / n) ** power


def _samples(kind, n, g):
    if kind == "normal":
        return torch.randn(n, generator=g)
    if kind == "heavy":  # Cauchy: a few huge values per block
        return torch.tan(math.pi * (torch.rand(n, generator=g) - 0.5))
    if kind == "tiny":  # magnitudes spread over 12 decades
        return torch.randn(n, generator=g) * 10 ** (-12 * torch.rand(n, generator=g))
    if kind == "zeros_mixed":  # whole zero blocks next to live ones, and scattered exact zeros
        x = torch.randn(n, generator=g)
        x[: min(n, 256)] = 0
        x[torch.rand(n, generator=g) < 0.2] = 0
        return x
    raise ValueError(kind)


def _bound(x, signed):
    """Per-element bound from an independent float64 computation: half the gap between the two levels
    around |x| / absmax of its block (for unsigned, values under level[1] go up to level[1]), + fp32 slack."""
    levels = _reference_levels(signed)
    x64 = x.double().reshape(-1)
    n = x64.numel()
    padded = torch.cat([x64, x64.new_zeros(-n % 256)]).view(-1, 256)
    absmax = padded.abs().amax(1, keepdim=True).expand(-1, 256).reshape(-1)[:n]
    r = torch.where(absmax > 0, x64.abs() / absmax.clamp(min=1e-300), torch.zeros_like(x64))
    hi = torch.searchsorted(levels, r).clamp(1, len(levels) - 1)
    bound = (levels[hi] - levels[hi - 1]) / 2 * absmax
    if not signed:
        under = (x64 > 0) & (r < levels[1])
        bound = torch.where(under, (levels[1] - r) * absmax, bound)
    return bound + 2.0**-20 * torch.maximum(x64.abs(), absmax * levels[hi]), absmax


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("kind", ["normal", "heavy", "tiny", "zeros_mixed"])
@pytest.mark.parametrize("numel", NUMELS)
def test_round_trip_within_half_step_of_the_map(signed, kind, numel):
    g = torch.Generator().manual_seed(numel)
    x = _samples(kind, numel, g)
    if not signed:
        x = x.square()
    codes, absmax = S.quantize_blockwise(x, signed)
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(numel / 256),)
    y = S.dequantize_blockwise(codes, absmax, signed)
    bound, _ = _bound(x, signed)
    err = (y.double() - x.double()).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    assert (y[x == 0] == 0).all()
    if not signed:
        assert (y[x > 0] > 0).all()  # a nonzero v never decodes to 0 (Adam would step m / eps)


def test_relative_error_on_gaussian_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256 * 512, generator=g)
    m = S.dequantize_blockwise(*S.quantize_blockwise(x, True), signed=True)
    v = S.dequantize_blockwise(*S.quantize_blockwise(x.square(), False), signed=False)
    assert ((m - x).abs() / x.abs()).mean() < 0.015
    assert ((v.sqrt() - x.abs()).abs() / x.abs()).mean() < 0.008  # sqrt(v) is what Adam divides by


@pytest.mark.parametrize("signed", [True, False])
def test_representable_values_are_exact(signed):
    g = torch.Generator().manual_seed(1)
    n = 127 if signed else 255
    levels = S.magnitude_levels(signed)
    torch.testing.assert_close(levels.double(), _reference_levels(signed), rtol=1e-7, atol=0)
    codes = torch.randint(-n if signed else 0, n + 1, (4, 256), generator=g)
    codes[:, 0] = n  # the block's absmax element
    absmax = torch.tensor([1.0, 3.7e-5, 2.5e4, 0.123])
    mags = levels[codes.abs()]
    x = (torch.where(codes < 0, -mags, mags) * absmax[:, None]).reshape(-1)
    got_codes, got_absmax = S.quantize_blockwise(x, signed)
    assert torch.equal(got_codes.long(), codes.reshape(-1))
    assert torch.equal(got_absmax, absmax)
    assert torch.equal(S.dequantize_blockwise(got_codes, got_absmax, signed), x)


def test_signed_map_is_symmetric_and_unsigned_floor():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, generator=g)
    assert torch.equal(S.quantize_blockwise(-x, True)[0], -S.quantize_blockwise(x, True)[0])
    v = torch.tensor([1e6, 1e-30, 1e-12, 0.0] + [1.0] * 252)
    y = S.dequantize_blockwise(*S.quantize_blockwise(v, False), signed=False)
    floor = 1e6 * 255.0**-6
    assert y[1] == y[2] and abs(y[1].item() - floor) < 1e-6 * floor  # tiny v rounds up to level 1
    assert y[3] == 0 and y[0] == 1e6


def test_state_api_round_trip_and_storage():
    shape = (37, 29)  # 1073 values: 5 blocks, the last one ragged
    state = {}
    S.new_moment8(state, "exp_avg", shape, True, "cpu")
    S.new_moment8(state, "exp_avg_sq", shape, False, "cpu")
    assert "exp_avg" not in state and "exp_avg_sq" not in state
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert torch.equal(S.read_moment8(state, "exp_avg"), torch.zeros(shape))
    g = torch.Generator().manual_seed(3)
    m, v = torch.randn(shape, generator=g), torch.rand(shape, generator=g)
    codes_before = state["exp_avg_q_int8"]
    S.write_moment8(state, "exp_avg", m)
    S.write_moment8(state, "exp_avg_sq", v)
    assert state["exp_avg_q_int8"] is codes_before  # re-quantized in place
    for name, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        got = S.read_moment8(state, name)
        assert got.dtype == torch.float32 and got.shape == shape
        assert torch.equal(got, S.dequantize_blockwise(*S.quantize_blockwise(x, signed), signed=signed))
        assert S.moment_nbytes(state, name) == 1073 + 4 * 5  # 1 byte a value + 4 bytes per 256
    assert S.moment_nbytes(state, "exp_avg") / (1073 * 4) < 0.26
    with pytest.raises(ValueError, match="shape"):
        S.write_moment8(state, "exp_avg", torch.zeros(10))


def test_state_survives_torch_load_cast():
    """Optimizer.load_state_dict casts codes to the param dtype; reading is unchanged, writing re-compacts."""
    state = {}
    S.new_moment8(state, "exp_avg_sq", (300,), False, "cpu")
    S.write_moment8(state, "exp_avg_sq", torch.rand(300) ** 4)
    before = S.read_moment8(state, "exp_avg_sq")
    cast = {k: t.to(torch.float32) for k, t in state.items()}
    assert torch.equal(S.read_moment8(cast, "exp_avg_sq"), before)
    S.write_moment8(cast, "exp_avg_sq", before)
    assert cast["exp_avg_sq_q_uint8"].dtype == torch.uint8
    assert torch.equal(S.read_moment8(cast, "exp_avg_sq"), before)


# --- which moments are 8-bit: >= 4096 values and a parameter that is not 1-D (bitsandbytes' min_8bit_size) ---


def _kinds(state):
    """ "8" if both moments are 8-bit codes, "32" if both are plain fp32 tensors (anything else fails)."""
    if {"exp_avg_q_int8", "exp_avg_sq_q_uint8", "exp_avg_absmax", "exp_avg_sq_absmax"} <= state.keys():
        assert "exp_avg" not in state and "exp_avg_sq" not in state
        return "8"
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert not any(k.endswith(("_q_int8", "_q_uint8", "_absmax")) for k in state)
    return "32"


def _moment_shape(state):
    from slimtune.optim.adam_core import read_moment

    return tuple(read_moment(state, "exp_avg").shape)


def test_moment_bits_rule():
    from slimtune.optim.adam_core import MIN_8BIT_SIZE, moment_bits

    assert MIN_8BIT_SIZE == 4096
    assert moment_bits((64, 64), 8) == 8 and moment_bits((4095, 1), 8) == 32 and moment_bits((63, 65), 8) == 32
    assert moment_bits((8192,), 8) == 32  # a 1-D parameter (a norm of a 8192-wide model)
    assert moment_bits((8192,), 8, param_ndim=2) == 8  # (k,) moments of a matrix (FRUGAL coordinates)
    assert moment_bits((2, 64, 64), 8) == 8 and moment_bits((4096, 4096), 32) == 32
    with pytest.raises(ValueError, match="32 or 8"):
        moment_bits((64, 64), 4)


# shape -> 8-bit in bitsandbytes.optim.AdamW8bit; slimtune agrees except for 1-D parameters (fp32 here)
BNB_SHAPES = [(64,), (32, 32), (4095,), (63, 65), (4096,), (64, 64), (128, 64), (3, 40, 40)]


def test_agrees_with_bitsandbytes_min_8bit_size():
    from slimtune.optim.adamw import AdamW

    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(4)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in BNB_SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, ref = AdamW(ours, lr=1e-3, state_bits=8), bnb.optim.AdamW8bit(theirs, lr=1e-3)
    for p, q in zip(ours, theirs):
        p.grad = q.grad = torch.randn(p.shape, generator=g)
    opt.step()
    ref.step()
    for p, q in zip(ours, theirs):
        bnb8 = ref.state[q]["state1"].dtype == torch.uint8
        assert bnb8 == (p.numel() >= 4096), p.shape  # bitsandbytes: p.numel() < min_8bit_size -> fp32
        assert _kinds(opt.state[p]) == ("8" if bnb8 and p.dim() > 1 else "32"), p.shape


@pytest.mark.parametrize(
    "shape, rank, kind",
    [
        ((512, 64), 8, "8"),  # moments (512, 8): 4096 values
        ((64, 512), 8, "8"),  # left side: (8, 512)
        ((128, 64), 8, "32"),  # (128, 8): 1024, though W has 8192
        ((64, 64), 64, "8"),
        ((64, 64), 63, "32"),
    ],
)
def test_galore_decides_by_the_projected_moment(shape, rank, kind):
    from slimtune.optim.galore import GaLoreAdamW

    g = torch.Generator().manual_seed(5)
    p, b = torch.nn.Parameter(torch.randn(shape, generator=g)), torch.nn.Parameter(torch.randn(64, generator=g))
    opt = GaLoreAdamW([p, b], lr=1e-3, rank=rank, update_gap=2, state_bits=8, reset_moments_on_update=True)
    for _ in range(3):  # across a refresh that re-creates the moments
        p.grad, b.grad = torch.randn(shape, generator=g), torch.randn(64, generator=g)
        opt.step()
        low = (shape[0], rank) if shape[0] >= shape[1] else (rank, shape[1])
        assert _kinds(opt.state[p]) == kind and _kinds(opt.state[b]) == "32"
        assert _moment_shape(opt.state[p]) == low


@pytest.mark.parametrize(
    "subspace, shape, density, kind",
    [
        ("coordinates", (128, 128), 0.25, "8"),  # (4096,)
        ("coordinates", (128, 128), 0.2, "32"),  # (3277,)
        ("blocks", (128, 64), 0.5, "8"),  # (128, 32)
        ("blocks", (128, 64), 0.25, "32"),  # (128, 16)
        ("modules", (64, 64), 1.0, "8"),
    ],
)
def test_frugal_decides_by_the_subspace_moment(subspace, shape, density, kind):
    from slimtune.optim.frugal import FRUGAL

    g = torch.Generator().manual_seed(6)
    p, b = torch.nn.Parameter(torch.randn(shape, generator=g)), torch.nn.Parameter(torch.randn(300, generator=g))
    opt = FRUGAL([p, b], lr=1e-3, density=density, subspace=subspace, update_gap=2, state_bits=8)
    for _ in range(3):  # across a reselection that re-creates the moments
        p.grad, b.grad = torch.randn(shape, generator=g), torch.randn(300, generator=g)
        opt.step()
        assert _kinds(opt.state[p]) == kind and _kinds(opt.state[b]) == "32"


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_is_bucketize_bit_for_bit(signed):
    """The 16-bit bucket table against torch's binary search: at every bucket's edges, at every midpoint and
    its neighbouring floats, and on random values spread over the decades the codes cover."""
    from slimtune.optim.states8bit import _tables, nearest_code

    mids = _tables(signed, "cpu")[1]
    edges = (torch.arange(0x3F81, dtype=torch.int32) << 16).view(torch.float32)  # 0 .. 1.0 and just above
    below_edges = (edges.view(torch.int32)[1:] - 1).view(torch.float32)
    near_mids = torch.cat([torch.nextafter(mids, torch.zeros_like(mids)), mids, torch.nextafter(mids, mids + 1)])
    g = torch.Generator().manual_seed(0)
    spread = torch.rand(1 << 20, generator=g) ** torch.randint(1, 12, (1 << 20,), generator=g).float()
    for x in (edges, below_edges, near_mids, spread, torch.zeros(7)):
        assert torch.equal(nearest_code(x.contiguous(), signed).long(), torch.bucketize(x, mids))


@pytest.mark.parametrize("signed", [True, False])
def test_byte_table_decodes_every_code_as_the_formula(signed):
    """int8 / uint8 codes (the table path) decode as the same integers held in floats (the direct path)."""
    codes = torch.arange(-127, 128) if signed else torch.arange(0, 256)
    codes = codes.repeat(4)[: 2 * 256].to(torch.int8 if signed else torch.uint8)
    absmax = torch.tensor([0.5, 3.0])
    got = S.dequantize_blockwise(codes, absmax, signed)
    want = S.dequantize_blockwise(codes.float(), absmax, signed)
    n, p = (S.SIGNED_CODES, S.SIGNED_POWER) if signed else (S.UNSIGNED_CODES, S.UNSIGNED_POWER)
    c = codes.double()
    formula = (c.abs() / n) ** p * torch.sign(c) * absmax.double().repeat_interleave(256)
    assert torch.equal(got, want) and torch.allclose(got.double(), formula, rtol=1e-6, atol=0)
