"""The bitsandbytes backend, the quant registry and quantize_model (nn.Sequential and a tiny Llama)."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimtune.quant import Int8Linear, NF4Linear, dequantize_weight, is_quantized_linear, quantize_model


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


HAS_BNB = _has_bnb()
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
ALL = [(backend, m) for backend in ("slimtune", "bitsandbytes") for m in ("nf4", "int8")]  # packed: test_packed.py


@needs_bnb
@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bnb_linear_forward_backward(method, dtype):
    import bitsandbytes as bnb

    from slimtune.quant.bnb import dequantize_bnb_weight, to_bnb_linear

    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    m = to_bnb_linear(lin, method)
    assert isinstance(m, bnb.nn.Linear4bit if method == "nf4" else bnb.nn.Linear8bitLt)
    assert is_quantized_linear(m) and not any(p.requires_grad for p in m.parameters())
    w = dequantize_bnb_weight(m)
    assert w.shape == (64, 128) and w.dtype == torch.float32
    assert (w - lin.weight).abs().max() < (0.2 if method == "nf4" else 0.01) * lin.weight.abs().max()
    x = torch.randn(2, 3, 128, dtype=dtype, requires_grad=True)
    y = m(x)  # train mode: for int8 bnb runs dequantize + fp matmul on CPU (MatMul8bitFp)
    assert y.dtype == dtype and y.shape == (2, 3, 64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ref = F.linear(x.float(), w, lin.bias)
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad.float(), g.float() @ w, rtol=tol, atol=tol)
    torch.testing.assert_close(dequantize_weight(m), w)  # the package-level dispatch


@needs_bnb
@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
def test_bnb_int8_eval_mode_quantizes_activations_but_backward_works():
    from slimtune.quant.bnb import dequantize_bnb_weight, to_bnb_linear

    torch.manual_seed(1)
    m = to_bnb_linear(nn.Linear(128, 64), "int8").eval()
    x = torch.randn(4, 128, requires_grad=True)
    y = m(x)  # eval: LLM.int8 matmul (activations cast to fp16, then int8), so only close to the fp reference
    w = dequantize_bnb_weight(m)  # scales now live on m.state, not the weight
    ref = F.linear(x, w, m.bias)
    assert (y - ref).norm() / ref.norm() < 0.02
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 64) @ w, rtol=1e-5, atol=1e-5)


@needs_bnb
def test_bnb_nf4_keeps_gradients_after_an_eval_forward():
    """bnb repacks Linear4bit in place on AVX512-BF16 CPUs after an eval, no-grad forward; the packed
    path has no autograd. to_bnb_linear turns that off, so training after evaluation keeps gradients."""
    from slimtune.quant.bnb import to_bnb_linear

    m = to_bnb_linear(nn.Linear(64, 64), "nf4")
    assert m.support_avx512bf16_for_cpu is False
    with torch.no_grad():
        m.eval()(torch.randn(2, 64))
    x = torch.randn(2, 64, requires_grad=True)
    m.train()(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@needs_bnb
def test_bnb_errors(monkeypatch):
    from slimtune.quant import bnb as qbnb

    with pytest.raises(ValueError, match="nf4, int8"):
        qbnb.to_bnb_linear(nn.Linear(64, 64), "fp4")
    with pytest.raises(TypeError):
        qbnb.dequantize_bnb_weight(nn.Linear(64, 64))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        qbnb.to_bnb_linear(nn.Linear(64, 64), "nf4")


def test_quantize_model_on_sequential():
    torch.manual_seed(2)
    shared = nn.Linear(64, 64)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), shared, shared, nn.Sequential(nn.Linear(128, 64)))
    model.add_module("lm_head", nn.Linear(64, 64))
    assert quantize_model(model, "none") == 0
    n = quantize_model(model, "int8", block_size=32, skip_modules=("lm_head", "4"))
    assert n == 3  # model.0, the shared linear (counted once, still shared), model.4.0
    assert isinstance(model[0], Int8Linear) and model[2] is model[3] and isinstance(model[2], Int8Linear)
    assert type(model[4]) is nn.Sequential and isinstance(model[4][0], Int8Linear)  # "4" is not a linear
    assert type(model.lm_head) is nn.Linear and model[0].block_size == 32
    assert quantize_model(model, "nf4") == 0  # already quantized: nothing left to replace
    with pytest.raises(ValueError, match="quant.method='nf9' is not registered.* nf4, .*int8a"):
        quantize_model(model, "nf9")
    with pytest.raises(ValueError, match="backend='gptq'; use slimtune or bitsandbytes"):
        quantize_model(model, "nf4", backend="gptq")


def test_quantize_model_frees_weights_but_not_tied_ones():
    emb = nn.Embedding(128, 64)
    model = nn.ModuleDict({"emb": emb, "proj": nn.Linear(64, 128, bias=False)})
    model.proj.weight = emb.weight  # tied (as an untied-lm_head model would be)
    old = model.proj
    assert quantize_model(model, "nf4", skip_modules=()) == 1
    assert old.weight is None and isinstance(model.proj, NF4Linear)
    assert emb.weight.shape == (128, 64)  # the embedding keeps its (shared) weight


def test_slimtune_backend_never_imports_bitsandbytes():
    code = (
        "import sys, torch; from slimtune.quant import quantize_model, is_quantized_linear, dequantize_weight; "
        "m = torch.nn.Sequential(torch.nn.Linear(64, 64)); quantize_model(m, 'nf4'); "
        "assert is_quantized_linear(m[0]) and not is_quantized_linear(torch.nn.Linear(2, 2)); "
        "dequantize_weight(m[0]); assert 'bitsandbytes' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("backend, method", ALL)
def test_quantize_model_tiny_llama(backend, method):
    if backend == "bitsandbytes" and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    ref, q = _tiny_llama(), _tiny_llama()
    n = quantize_model(q, method, backend=backend)
    assert n == 2 * 7  # q k v o gate up down per layer, not lm_head
    assert type(q.lm_head) is nn.Linear
    assert not any(type(m) is nn.Linear for name, m in q.named_modules() if name != "lm_head")
    quantized = [m for m in q.modules() if is_quantized_linear(m)]
    assert len(quantized) == n
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        a, b = ref(input_ids=x).logits, q(input_ids=x).logits.float()
    rel = ((a - b).norm() / a.norm()).item()
    # Random N(0, 0.02) weights: NF4 has ~10% relative RMS error per weight, which gives ~0.14 here
    # (bnb's NF4 gives the same); INT8 ~0.007. Exactness of the plumbing is checked below.
    assert rel < (0.2 if method == "nf4" else 0.02), rel
    # the quantized model == the float model running on the dequantized weights
    # (bnb int8 in eval also quantizes activations, so it is only close to it)
    for name, m in q.named_modules():
        if is_quantized_linear(m):
            ref.get_submodule(name).weight.data = dequantize_weight(m)
    with torch.no_grad():
        a = ref(input_ids=x).logits
    exact = not (backend == "bitsandbytes" and method == "int8")
    assert ((a - b).norm() / a.norm()).item() < (1e-5 if exact else 0.02)


@needs_bnb
def test_slimtune_nf4_model_equals_bitsandbytes_nf4_model():
    """Same codes, same scales: slimtune's NF4 model gives bnb's logits (double quant off)."""
    ours, theirs = _tiny_llama(), _tiny_llama()
    quantize_model(ours, "nf4", backend="slimtune", double_quant=False)
    quantize_model(theirs, "nf4", backend="bitsandbytes", double_quant=False)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits.float(), rtol=1e-5, atol=1e-5)
