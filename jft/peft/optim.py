"""Which delta leaves an optimiser phase trains: labels, masks, the masked optimiser, and
restarting the optimiser state of reselected entries.

The optimiser works on the trainable part of the adapters (`jft.peft.partition`): leaves a
method marks non-trainable (indices, permutations, parked layers) are None there and have
no optimiser state. Gradients are only ever taken over that part (the frozen base is a
separate, non-differentiated argument), so masking here only picks, among trainable delta
leaves, which ones a phase updates.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import jax
import jax.numpy as jnp
import optax

from jft.peft.base import Adapter, partition


def labels(adapters: Sequence[Adapter]) -> list:
    """The trainable part of `adapters` with each leaf replaced by its role, such as
    `lora/q_proj/a` or `lora/down_proj/magnitude`."""

    def one(adapter: Adapter):
        def label(path, _):
            keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
            keys = [k for k in keys if k != "layers"]
            return "/".join([adapter.method, *keys])

        tree = jax.tree_util.tree_map_with_path(label, adapter.delta)
        return adapter.with_delta(tree)

    return [one(adapter) for adapter in partition(adapters)[0]]


def mask(adapters: Sequence[Adapter], train: Callable[[str], bool] | Collection[str] | None = None):
    """True for the trainable leaves this phase trains: all by default, or those whose
    label passes `train` (a predicate, or a collection of label prefixes)."""
    if train is None:
        select = lambda label: True  # noqa: E731
    elif callable(train):
        select = train
    else:
        prefixes = tuple(train)
        select = lambda label: label.startswith(prefixes)  # noqa: E731
    return jax.tree.map(select, labels(adapters))


def masked_optimizer(optimizer: optax.GradientTransformation, adapters: Sequence[Adapter],
                     train=None) -> optax.GradientTransformation:
    """`optimizer` on the selected trainable leaves; every other one gets a zero update (and
    no optimiser state). Leaves a method overrides (`optimizer_overrides`) get its own
    transform instead, whatever the phase."""
    transforms = {"train": optimizer, "freeze": optax.set_to_zero()}
    roles = []
    for adapter, selected in zip(labels(adapters), mask(adapters, train), strict=True):
        overrides = adapter.impl.optimizer_overrides(adapter.config)
        transforms |= {f"{adapter.method}:{name}": tx for name, tx in overrides.items()}

        def role(label, keep, adapter=adapter, overrides=overrides):
            name = label.rsplit("/", 1)[-1]
            if name in overrides:
                return f"{adapter.method}:{name}"
            return "train" if keep else "freeze"

        roles.append(jax.tree.map(role, adapter, selected))
    return optax.multi_transform(transforms, roles)


def reset_state(optimizer: optax.GradientTransformation, opt_state, adapters: Sequence[Adapter],
                resets: Sequence) -> optax.OptState:
    """`opt_state` with the entries `resets` marks (one tree per adapter, shaped like its
    delta, bool leaves broadcastable to the delta's) set to zero, as a fresh optimiser has
    them; counters and other non-parameter state are left alone."""
    trainable = partition(adapters)[0]
    flags = [
        jax.tree.map(lambda leaf, flag: None if leaf is None else jnp.asarray(flag, bool),
                     part.delta, reset, is_leaf=lambda x: x is None)
        for part, reset in zip(trainable, resets, strict=True)
    ]
    flags = [a.with_delta(f) for f, a in zip(flags, trainable, strict=True)]

    def is_leaf(x):
        return x is None or isinstance(x, optax.MaskedNode)

    def restart(leaf, flag):
        if is_leaf(leaf) or flag is None:
            return leaf
        return jnp.where(flag, jnp.zeros_like(leaf), leaf)

    return optax.tree_utils.tree_map_params(optimizer, restart, opt_state, flags,
                                            transform_non_params=lambda x: x, is_leaf=is_leaf)
