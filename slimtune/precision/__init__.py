"""Training-precision linears (`train.precision`): fp8 / HALO (fp8.py), MXFP4 Quartet (quartet.py), each
registered in PRECISIONS by its file; swap.py swaps them into a model."""

from slimtune.precision import fp8, quartet, swap  # noqa: F401  (register fp8, halo, mxfp4)
