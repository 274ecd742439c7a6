"""What loading leaves resident: weights still backed by the mapped safetensors file are copied out (the
file is unmapped), tied weights stay tied; a CPU-only process never imports triton."""

import subprocess
import sys

import pytest
import torch

from slimtune.formats.hf import load_model
from slimtune.memory import _file_ranges, release_file_mappings, trim_heap


def _in_file(model) -> int:
    ranges = _file_ranges()
    return sum(
        any(lo <= t.untyped_storage().data_ptr() < hi for lo, hi in ranges)
        for t in [*model.parameters(), *model.buffers()]
    )


def test_weights_backed_by_the_file_are_copied_out_and_the_file_unmapped():
    model = load_model("tiny-llama", "float32")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert _in_file(model) > 0  # from_pretrained keeps views of the mapping (the reason for the release)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    ptrs = [t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]]
    ours = [r for r in _file_ranges() if any(r[0] <= p < r[1] for p in ptrs)]
    n = release_file_mappings(model)
    assert n > 0 and _in_file(model) == 0
    assert not set(ours) & set(_file_ranges())  # nothing else held this model's mapping: its pages left
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    assert release_file_mappings(model) == 0
    assert isinstance(trim_heap(), bool)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernels import triton")
def test_a_cpu_only_run_does_not_import_triton():
    code = (
        "import sys, slimtune.cli, slimtune.trainer.loop, slimtune.kernels.linear_cross_entropy, "
        "slimtune.quant.linear; print('triton' in sys.modules)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
