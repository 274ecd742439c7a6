"""Triton kernels, each in its own file beside its torch reference (Liger-Kernel's layout).

Every public op `op(...)` dispatches with `use_triton(*tensors)`: the Triton kernel for CUDA tensors when
triton is importable, else the torch reference. `train.kernels=reference|triton` (or the SLIMTUNE_KERNELS override)
forces one
(`triton` on CPU tensors needs `TRITON_INTERPRET=1`, which is how the tests run the kernels).
"""

from slimtune.kernels.dispatch import configure, kernel_backend, use_triton

__all__ = ["configure", "kernel_backend", "use_triton"]
