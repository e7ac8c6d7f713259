"""Choosing what to fine-tune on: `python -m jft.select` (docs/selection.md).

A selection method ranks the records of a pool (any data file `jft.train` reads) and the
top `budget` are written back unchanged, in the pool's own format, with a scores file.
The methods (`jft/select/methods/`, one file each) share the scoring machinery here:
`features.py` (batched, jitted per-example losses, entropies and embeddings),
`gradients.py` with `projection.py` (per-example LoRA gradients, randomly projected),
`transport.py` (GOT-D's optimal transport), `kmeans.py` and `diversity.py` (kMQ and
the embedding dedup). `active.py` is STAR's active learning with LoRA.
"""
