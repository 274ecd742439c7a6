"""Triton kernels, each in its own file beside its torch reference (Liger-Kernel's layout).

Every public op `op(...)` dispatches with `use_triton(*tensors)`: the Triton kernel for CUDA tensors when
triton is importable, else the torch reference. `SLIMTUNE_KERNELS=reference|triton` forces one
(`triton` on CPU tensors needs `TRITON_INTERPRET=1`, which is how the tests run the kernels).
"""

from slimtune.kernels.dispatch import kernel_backend, use_triton

__all__ = ["kernel_backend", "use_triton"]
