"""slimtune: memory-efficient fine-tuning of language models.

The Python API (slimtune/api.py): load, add_adapter, optimizer, lr_scheduler, batches, loss, hf_inputs, hf_loss,
save, run. Importing the package imports the plugin packages, which fill the registries (slimtune.registry) that
the config validates against: registering an adapter, format, optimizer or precision makes it selectable.
"""

__version__ = "0.1.0"

from slimtune import adapters, engines, optim, precision, quant  # noqa: E402,F401  (fill the registries)
from slimtune.formats import compressed_io, peft, quantized, sparse_ft  # noqa: E402,F401  (ADAPTER_FORMATS, DIR_VERIFIERS)
from slimtune.quant import qat  # noqa: E402,F401  (the qat section and its declaration)
from slimtune.prune import layerwise  # noqa: E402,F401  (DIR_VERIFIERS: the pruned dir, until formats/pruned.py)
from slimtune.api import (  # noqa: E402  (the Python API)
    add_adapter,
    batches,
    hf_inputs,
    hf_loss,
    load,
    loss,
    lr_scheduler,
    optimizer,
    run,
    save,
)

__all__ = ["add_adapter", "batches", "hf_inputs", "hf_loss", "load", "loss", "lr_scheduler", "optimizer", "run", "save"]
