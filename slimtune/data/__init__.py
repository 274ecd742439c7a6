"""Data: sources -> records -> documents (sources.py), tokenized once into a memory-mapped cache (cache.py),
packed into blocks on demand (blocks.py), split (splits.py) and ordered into batches (order.py)."""

from slimtune.data.blocks import Blocks, TokenBlocks, pack, pack_documents, pad_documents  # noqa: F401
from slimtune.data.cache import TokenFile, token_file  # noqa: F401
from slimtune.data.order import BatchOrder, eval_batches, micro_batch  # noqa: F401
from slimtune.data.sources import IGNORE, documents, iter_records, load_records, tokenize  # noqa: F401
from slimtune.data.splits import (  # noqa: F401
    SPLIT_SEED,
    DataSplits,
    build_blocks,
    build_splits,
    split,
    splits_for,
    text_windows,
)
