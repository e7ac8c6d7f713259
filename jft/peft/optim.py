"""Which delta leaves an optimiser phase trains: labels, masks and the masked optimiser.

Gradients are only ever taken over the adapters (the frozen base is a separate,
non-differentiated argument), so masking here never hides a full-model gradient: it
only picks, among delta leaves, which ones a phase updates.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import jax
import optax

from jft.peft.base import Adapter


def labels(adapters: Sequence[Adapter]) -> list:
    """A tree shaped like `adapters` whose leaves name their role, such as
    `lora/q_proj/a`, `lora/down_proj/magnitude` or `frozen` for recorded constants."""

    def one(adapter: Adapter):
        trainable = adapter.impl.trainable(adapter.delta, adapter.config)

        def label(path, _, train):
            keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
            keys = [k for k in keys if k != "layers"]
            return "/".join([adapter.method, *keys]) if train else "frozen"

        tree = jax.tree_util.tree_map_with_path(label, adapter.delta, trainable)
        return Adapter(tree, adapter.method, adapter.config)

    return [one(adapter) for adapter in adapters]


def mask(adapters: Sequence[Adapter], train: Callable[[str], bool] | Collection[str] | None = None):
    """True for the leaves this phase trains: every trainable leaf by default, or those
    whose label passes `train` (a predicate, or a collection of label prefixes)."""
    if train is None:
        select = lambda label: label != "frozen"  # noqa: E731
    elif callable(train):
        select = lambda label: label != "frozen" and train(label)  # noqa: E731
    else:
        prefixes = tuple(train)
        select = lambda label: label != "frozen" and label.startswith(prefixes)  # noqa: E731
    return jax.tree.map(select, labels(adapters))


def masked_optimizer(optimizer: optax.GradientTransformation, adapters: Sequence[Adapter],
                     train=None) -> optax.GradientTransformation:
    """`optimizer` on the selected leaves; every other leaf gets a zero update (and no
    optimiser state)."""
    selection = mask(adapters, train)
    phase_labels = jax.tree.map(lambda keep: "train" if keep else "freeze", selection)
    return optax.multi_transform(
        {"train": optimizer, "freeze": optax.set_to_zero()}, phase_labels
    )
