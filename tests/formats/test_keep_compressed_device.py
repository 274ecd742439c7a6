"""model.keep_compressed=true on a device: `to_device` moves the model without materializing the encoded
layers' placeholders (model.to() would allocate every decoded weight), and each layer then decodes on that
device: DFloat11 bf16 codes by the Triton kernel on CUDA (kernels/dfloat11_decode.py), the other kinds on the
host and copied over. The CUDA half runs on a GPU machine only (benchmarks/gpu_check.sh)."""

import pytest
import torch

from slimtune.cli import main
from slimtune.formats.compressed_memory import to_device
from slimtune.model.load import load_base
from slimtune_testutil import TINY


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("kc")
    assert main(["prune", *TINY, "model.dtype=bfloat16", f"output_dir={root / 'w50'}"]) == 0
    for fmt in ("dfloat11", "sparse-nf4"):
        assert main(["export", str(root / "w50"), "--format", fmt, "--out", str(root / fmt)]) == 0
    return root


def _layer_params(model):
    return [p for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2]


@pytest.mark.parametrize("fmt", ["dfloat11", "sparse-nf4"])
def test_to_device_keeps_the_layers_encoded(exports, fmt):
    kept = load_base(str(exports / fmt), "float32", keep_compressed=True)
    moved = load_base(str(exports / fmt), "float32", keep_compressed=True).to(torch.float64)  # a conversion
    assert any(p.untyped_storage().nbytes() > 4 for p in _layer_params(moved))  # as a device move: materialized
    to_device(kept, "cpu")
    assert all(p.untyped_storage().nbytes() <= 4 for p in _layer_params(kept))
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(kept(ids).logits, load_base(str(exports / fmt), "float32")(ids).logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["dfloat11", "sparse-nf4"])
def test_keep_compressed_decodes_on_the_gpu(exports, fmt, monkeypatch):
    import slimtune.kernels.dfloat11_decode as kernel

    calls = []
    real = kernel.decode_triton
    monkeypatch.setattr(kernel, "decode_triton", lambda parts, check=True: calls.append(1) or real(parts, check))
    decoded = load_base(str(exports / fmt), "float32").cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    kept = to_device(load_base(str(exports / fmt), "float32", keep_compressed=True), "cuda")
    layer_bytes = sum(p.numel() * 4 for p in _layer_params(decoded))
    all_bytes = sum(p.numel() * p.element_size() for p in decoded.parameters())
    assert torch.cuda.memory_allocated() - base < all_bytes - layer_bytes / 2  # the layers were not materialized
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        torch.testing.assert_close(kept(ids).logits, decoded(ids).logits, rtol=0, atol=0)
    assert all(p.device.type == "cuda" and p.untyped_storage().nbytes() <= 4 for p in _layer_params(kept))
    assert (len(calls) > 0) == (fmt == "dfloat11")  # the DFloat11 bf16 codes decode by the Triton kernel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_loader_decodes_dfloat11_on_the_gpu_bit_exactly(exports, monkeypatch):
    import slimtune.kernels.dfloat11_decode as kernel
    from slimtune.kernels import dispatch

    calls = []
    real = kernel.decode_triton
    monkeypatch.setattr(kernel, "decode_triton", lambda parts, check=True: calls.append(1) or real(parts, check))
    on_gpu = load_base(str(exports / "dfloat11"), "bfloat16").state_dict()
    assert calls
    with dispatch.using("reference"):  # the CPU lockstep decoder
        on_cpu = load_base(str(exports / "dfloat11"), "bfloat16").state_dict()
    assert all(
        torch.equal(
            on_gpu[k].view(torch.int16) if on_gpu[k].dtype == torch.bfloat16 else on_gpu[k],
            on_cpu[k].view(torch.int16) if on_cpu[k].dtype == torch.bfloat16 else on_cpu[k],
        )
        for k in on_cpu
    )
