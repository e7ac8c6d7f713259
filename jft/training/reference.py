"""Reference log-probabilities computed once, before training, and cached in the run.

The reference of DPO, IPO and KTO is the policy as it starts: the base with the adapter
off, or the adapter of `objective.reference` (which the policy then continues). Where
switching the adapter off does not give it back (methods that train the base's own
weights, inits that rewrite the base such as PiSSA), or when asked
(`objective.precompute_reference`), or with `objective.reference`, the reference's
per-token log-probabilities of every training and eval sequence are computed with the
initial adapters before the first update, saved to `output_dir/reference_logps.safetensors`
and batched beside the tokens (`REFERENCE_FIELD`); no reference pass runs per step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jft.errors import JftError
from jft.objectives.sequences import REFERENCE_FIELD
from jft.training.data import PairedExamples, TokenizedExamples

CACHE_FILE = "reference_logps.safetensors"


def sequence_logps(logps_of_batch, examples: TokenizedExamples, max_length: int,
                   rows: int, pad_id: int) -> np.ndarray:
    """Per-token log-probabilities [tokens] of every sequence of `examples` (aligned with
    `examples.tokens`), computed `rows` sequences at a time by `logps_of_batch` (a batch
    dict to [rows, max_length] log-probs). Tokens past max_length, which the batcher cuts
    off, get 0."""
    out = np.zeros(len(examples.tokens), np.float32)
    for start in range(0, len(examples), rows):
        indices = range(start, min(start + rows, len(examples)))
        tokens = np.full((rows, max_length), pad_id, np.int32)
        segments = np.zeros((rows, max_length), np.int32)
        positions = np.zeros((rows, max_length), np.int32)
        for row, index in enumerate(indices):
            ids = examples.arrays(index)[0][:max_length]
            tokens[row, :len(ids)] = ids
            segments[row, :len(ids)] = 1
            positions[row, :len(ids)] = np.arange(len(ids))
        batch = {"tokens": tokens, "segment_ids": segments, "positions": positions,
                 "loss_mask": segments > 0}
        logps = np.asarray(logps_of_batch(batch), np.float32)
        for row, index in enumerate(indices):
            begin = examples.offsets[index]
            n = min(examples.lengths[index], max_length)
            out[begin:begin + n] = logps[row, :n]
    return out


def with_reference(examples: PairedExamples, first: np.ndarray, second: np.ndarray
                   ) -> PairedExamples:
    return PairedExamples(examples.first.with_field(REFERENCE_FIELD, first),
                          examples.second.with_field(REFERENCE_FIELD, second))


def compute(logps_of_batch, splits: dict[str, PairedExamples], max_length: int, rows: int,
            pad_id: int) -> dict[str, np.ndarray]:
    """{split_first, split_second: per-token log-probs} of every split's sequences."""
    out = {}
    for split, examples in splits.items():
        for half in ("first", "second"):
            out[f"{split}_{half}"] = sequence_logps(logps_of_batch, getattr(examples, half),
                                                    max_length, rows, pad_id)
    return out


def read_cache(directory: Path, splits: dict[str, PairedExamples]) -> dict[str, np.ndarray]:
    """The cached log-probs of a run being resumed, checked against its data."""
    from safetensors.numpy import load_file

    path = Path(directory) / CACHE_FILE
    if not path.exists():
        raise JftError(f"{path}: missing; the run's reference log-probabilities were cached "
                       "there before its first update and cannot be recomputed from the "
                       "trained adapter; start the run again with --overwrite")
    try:
        cached = load_file(str(path))
    except Exception as error:  # safetensors raises several kinds for a damaged file
        raise JftError(f"{path}: unreadable ({error}); start the run again with --overwrite"
                       ) from None
    for split, examples in splits.items():
        for half in ("first", "second"):
            key, tokens = f"{split}_{half}", len(getattr(examples, half).tokens)
            if key not in cached or cached[key].shape != (tokens,):
                raise JftError(f"{path}: holds no log-probs for the {tokens} tokens of the "
                               f"{split} data's {half} sequences; the data changed since the "
                               "run started; start it again with --overwrite")
    return cached


def write_cache(directory: Path, values: dict[str, np.ndarray]) -> None:
    from jft.storage import save_safetensors

    save_safetensors(values, Path(directory) / CACHE_FILE)
