"""slimtune must import and train where triton is not installed (README command 1 installs no triton):
every kernel module guards its triton import and the trainer falls back to the torch references."""

import subprocess
import sys

SCRIPT = r"""
import sys

class HideTriton:  # a machine without triton: find_spec fails, import fails
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, HideTriton())
sys.path.insert(0, "tests")
from slimtune_testutil import TINY
from slimtune.cli import main
import slimtune.kernels.fp8_matmul, slimtune.kernels.mxfp4, slimtune.kernels.hadamard  # noqa
import slimtune.kernels.nf4_matmul, slimtune.kernels.linear_cross_entropy  # noqa
assert "triton" not in sys.modules or sys.modules["triton"] is None
out = sys.argv[1]
for recipe, precision in (("qlora", "default"), ("lora", "mxfp4"), ("full", "halo")):
    args = [*TINY, "train.max_steps=2", f"train.precision={precision}", f"output_dir={out}/{recipe}-{precision}"]
    assert main(["run", recipe, *args]) == 0
print("ok")
"""


def test_trains_without_triton(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
