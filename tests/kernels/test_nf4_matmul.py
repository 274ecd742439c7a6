"""nf4_matmul: the Triton kernel (TRITON_INTERPRET=1 without CUDA) against its torch reference, and the
reference against independent ones: bitsandbytes' NF4 dequantization, and the QLoRA formula written out."""

import pytest
from slimtune_testutil import use_kernels
import torch

from slimtune.kernels.dispatch import interpreting
from slimtune.kernels.nf4_matmul import nf4_matmul, nf4_matmul_reference
from slimtune.quant.nf4 import quantize_nf4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreting(), reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1"
)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}

# (M, N, K, block_size): ragged M/N, one row, K not a multiple of the tile, blocks straddling rows (K=200, 16)
SHAPES = [(1, 16, 64, 64), (5, 48, 128, 64), (33, 40, 192, 64), (7, 24, 96, 32), (3, 4, 200, 16)]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    use_kernels(monkeypatch, "triton")


def _problem(m, n, k, block_size, double_quant, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = quantize_nf4(torch.randn(n, k, generator=g).to(DEVICE), block_size, double_quant).operand()
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


def _assert_close(got, want, dtype):
    scale = want.float().abs().max().clamp_min(1.0)
    err = (got.float() - want.float()).abs().max() / scale
    assert got.dtype == want.dtype and got.shape == want.shape
    assert err < TOL[dtype], f"max error {err:.2e} (relative to {scale:.2f})"


@pytest.mark.parametrize("m,n,k,block_size", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_matches_reference(m, n, k, block_size, double_quant):
    x, w, b = _problem(m, n, k, block_size, double_quant, torch.float32)
    _assert_close(nf4_matmul(x, w, b), nf4_matmul_reference(x, w, b), torch.float32)


@pytest.mark.parametrize("double_quant", [False, True])
def test_no_bias_and_leading_dims(double_quant):
    x, w, _ = _problem(6, 40, 128, 64, double_quant, torch.float32, bias=False)
    x3 = x.view(2, 3, 128)
    y = nf4_matmul(x3, w)
    assert y.shape == (2, 3, 40)
    _assert_close(y, nf4_matmul_reference(x3, w), torch.float32)


def test_bf16_matches_reference():
    x, w, b = _problem(9, 40, 128, 64, True, torch.bfloat16)
    # fp32 math on the bf16-rounded operands; the kernel rounds only its output
    want = nf4_matmul_reference(x.float(), w, b.float()) if DEVICE == "cpu" else nf4_matmul_reference(x, w, b)
    _assert_close(nf4_matmul(x, w, b), want.to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("double_quant", [False, True])
def test_grads_match_reference(double_quant):
    x, w, b = _problem(11, 24, 96, 32, double_quant, torch.float32)
    grads = []
    for fn in (nf4_matmul, nf4_matmul_reference):
        xi, bi = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = fn(xi, w, bi)
        y.backward(torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y))
        grads.append((xi.grad, bi.grad))
    (gx, gb), (rx, rb) = grads
    _assert_close(gx, rx, torch.float32)
    _assert_close(gb, rb, torch.float32)


# the 16 NF4 values of the QLoRA paper (appendix E), typed in here: independent of slimtune's constant
QLORA_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def _by_hand(w):
    """W[i] = NF4[code_i] * absmax(block of i); codes two per byte, the first in the high nibble; a
    double-quantized absmax = q * scale[block // 256] / 127 + offset. Plain Python loops over values."""
    codes = w.codes.cpu().tolist()
    flat_codes = [c for byte in codes for c in (byte >> 4, byte & 15)]
    if w.double_quant:
        q, sc, off = w.absmax_q.cpu().tolist(), w.absmax_scale.cpu().tolist(), w.absmax_offset.cpu().tolist()[0]
        absmax = [q[i] * (sc[i // 256] / 127) + off for i in range(len(q))]
    else:
        absmax = w.absmax.cpu().tolist()
    vals = [QLORA_NF4[c] * absmax[i // w.block_size] for i, c in enumerate(flat_codes)]
    return torch.tensor(vals, dtype=torch.float32).view(w.shape)


@pytest.mark.parametrize("double_quant", [False, True])
def test_reference_matches_the_formula_by_hand(monkeypatch, double_quant):
    use_kernels(monkeypatch, "reference")
    x, w, b = _problem(4, 8, 48, 16, double_quant, torch.float32)
    want = x.cpu() @ _by_hand(w).T + b.cpu()
    torch.testing.assert_close(nf4_matmul(x, w, b).cpu(), want, rtol=1e-5, atol=1e-5)


def test_reference_matches_bitsandbytes(monkeypatch):
    """slimtune's NF4 codes and fp32 absmax are bitsandbytes' (double quantization differs: bnb's 8-bit
    dynamic map for the scales), so without it the reference equals bnb's dequantize_4bit of the same W."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    use_kernels(monkeypatch, "reference")
    g = torch.Generator().manual_seed(3)
    W = torch.randn(24, 64, generator=g)
    x = torch.randn(5, 64, generator=g)
    packed, state = bnb_f.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    theirs = bnb_f.dequantize_4bit(packed, state)
    ours = nf4_matmul(x.to(DEVICE), quantize_nf4(W.to(DEVICE), 64, double_quant=False).operand())
    torch.testing.assert_close(ours.cpu(), x @ theirs.T, rtol=1e-5, atol=1e-5)


def test_odd_in_features_rejected():
    w = quantize_nf4(torch.randn(2, 3, device=DEVICE), block_size=2, double_quant=False).operand()
    with pytest.raises(ValueError, match="even in_features"):
        nf4_matmul(torch.randn(1, 3, device=DEVICE), w)


@pytest.mark.slow
@pytest.mark.parametrize("double_quant", [False, True])
def test_larger_shape(double_quant):
    x, w, b = _problem(130, 260, 512, 64, double_quant, torch.float32)
    _assert_close(nf4_matmul(x, w, b), nf4_matmul_reference(x, w, b), torch.float32)
