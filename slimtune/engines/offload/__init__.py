"""Training beyond memory: slimtune's own disk offload of weights and optimizer state.

store.py    unit files (one per decoder layer, embeddings, head) with chunk checksums and atomic versions
snapshot.py hard-link snapshots, and their restore (every name and checksum checked: run dirs are untrusted)
rundir.py   each run's own store directory (live store, snapshots, the lock held while it runs)
pool.py     fixed, page-aligned buffer slabs in a few size classes (memory stays flat as the model grows)
units.py    how a causal LM is cut into units, and placeholders for the weights not in memory
stream.py   forward/backward hooks that load units ahead of compute, and the per-unit update worker
update.py   one unit's optimizer step with its state streamed chunk by chunk (bitwise the in-memory step)

engines/offload/engine.py puts them behind the trainer's Engine interface (`offload.*` keys).
"""
