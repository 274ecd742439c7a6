"""Engines: how the built model runs forward, backward and the optimizer step (ENGINES registry, engine.name).

ddp.py (in memory; DDP under torchrun; the interface the others implement), fsdp2.py, deepspeed.py,
offload/ (slimtune's layer streaming from disk: store, buffer pool, device mirror, its engine). Where state
lives is one spelling for all: engine.params / engine.optimizer = none | cpu | disk (auto: the engine's own
default: disk for offload, none for the others).
"""

from slimtune.engines import ddp, deepspeed, fsdp2  # noqa: F401  (register ddp, deepspeed, fsdp2)
from slimtune.engines.offload import engine  # noqa: F401  (registers offload)
