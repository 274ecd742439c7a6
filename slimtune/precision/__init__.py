"""Training-precision linears (`train.precision`): fp8 / HALO (fp8.py), MXFP4 Quartet (quartet.py), swapped in
by swap.py; each registered in PRECISIONS."""

from slimtune.precision import swap  # noqa: F401  (registers fp8, halo, mxfp4)
