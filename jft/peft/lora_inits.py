"""The data-driven LoRA inits: PiSSA, EVA, CorDA and LoRA-GA, as PEFT computes them, and
LoftQ's, which quantizes the base together with the factors.

Everything is in jft's layout: a weight [*in, *out] is taken as a matrix W [in, out]
(PEFT's `weight.T`), A is [in, r] (PEFT's `lora_A.T`) and B [r, out] (`lora_B.T`), so
the adapter adds s x A B. Per-layer ranks (`rank_pattern`) are padded to the module's
largest rank, the padding zero (and masked by `plan`).

- `pissa`: W = U S V^T; A = U_r sqrt(S_r / s), B = sqrt(S_r / s) V_r^T, so s A B is W's
  best rank-r approximation. Option `niter`: torch's randomized `svd_lowrank` with that
  many subspace iterations (PEFT's "pissa_niter_[n]") instead of the exact SVD.
- `eva`: A's columns are the top-r principal directions of the linear's inputs over the
  calibration batches, B = 0. Options `rho` (rank redistribution, see `init_eva`),
  `whiten`, `use_label_mask`, `adjust_scaling_factors`, as PEFT's EvaConfig. The pieces
  are public: `eva_statistics` (directions and explained-variance ratios),
  `eva_redistribute` (PEFT's rank rule), `eva_config` (the ranks as a rank_pattern).
- `corda`: C = the inputs' covariance (each batch scaled by its largest entry, averaged
  over batches), damped until invertible; W' = C W = U S V^T;
  A = C^-1 U_r sqrt(S_r / s), B = sqrt(S_r / s) V_r^T, with the largest r singular
  components for `corda_method="ipm"` (default), the smallest for "kpm".
- `loraga`: G = the mean gradient of the next-token loss over the calibration batches
  w.r.t. W; G = U S V^T; `direction` picks A's columns from U and B's rows from S V^T
  ("ArB2r": A = U[:, :r], B = S[r:2r] V[:, r:2r]^T), `scale` rescales them ("stable": B
  times out^(1/4) / sqrt(stable_gamma)). Options `direction`, `scale`, `stable_gamma`;
  `loraga_gradients` gives G itself.

- `loftq` (a quantized base only): Q and A, B chosen together so that dequantize(Q) +
  s A B ~ W (`jft.quant.loftq`, which says where it differs from PEFT). It needs the
  float W while the base is quantized, so it is not computed from a base here: `init`
  refuses, and the loader calls `loftq_params` (float base -> quantized base, delta) or
  `jft.quant.loftq.loftq_weight` per weight plus `loftq_delta`. Option `loftq_iter`
  (PEFT's, default 1: Q is plain quantization's, A B the SVD of its error). The delta
  records A0, B0 (so exports over the original W are W + s (A B - A0 B0)), but
  `Lora.rebase` leaves the base alone: the rewritten base is the quantized Q.

PiSSA, CorDA and LoRA-GA start from a non-zero s A0 B0, so the model is unchanged only
on the base W - s A0 B0: the delta records A0, B0 as `init_a` / `init_b` (not trainable)
and `Lora.rebase` computes that base. This module never touches the base.

Calibration batches are dicts with "tokens" [B, T], optional "segment_ids" [B, T] (0:
padding, which is left out of every statistic) and optional "loss_mask" [B, T] (True
where the token is a training target, HF's `labels != -100`): LoRA-GA's loss counts
those targets only, and EVA with `use_label_mask` uses the inputs at those positions.

Where jft differs from PEFT, on purpose:
- EVA computes each input's exact principal directions from its mean and centred
  scatter matrix, merged batch by batch (Chan's update), then an eigendecomposition;
  PEFT runs an incremental (randomised) PCA and stops when the directions stop moving
  (`tau`). Same target, no early stop, and [in, in] statistics per input and layer
  (layers are processed one at a time, so only one layer's statistics are held).
- EVA's rank redistribution (`rho` > 1, PEFT's default 2) changes the config's ranks:
  `init_eva` returns the new config (a `rank_pattern` / `alpha_pattern` per layer) with
  the delta, and `jft.peft.create` (through `Lora.init_with_config`) uses it.
- LoRA-GA takes the exact SVD of the gradient (PEFT: `svd_lowrank(q=4r, niter=4)`), and
  PiSSA / CorDA / LoRA-GA compute in float32 with "highest" matmul precision.
- Padding tokens are left out of CorDA's covariance (PEFT's hook sees them).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.models import ModelConfig
from jft.models.sites import input_group, linear_site, linear_sites
from jft.models.transformer import LayerHooks, decoder_layer, embed, packed_layer_inputs
from jft.peft.lora import LoraConfig, _column_norm, plan

OPTIONS: dict[str, dict[str, Any]] = {
    "pissa": {"niter": None},
    "eva": {"rho": 2.0, "whiten": False, "use_label_mask": True, "adjust_scaling_factors": True},
    "corda": {"corda_method": "ipm"},
    "loraga": {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16},
    "loftq": {"loftq_iter": 1},
}
_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
_SCALES = ("stable", "weight_svd", "gd_scale", "unit")
# Linears that read the same input share one set of statistics (PEFT's EVA finds these by
# hashing the inputs; the sites declare them: `jft.models.sites.input_group`).


def options(config: LoraConfig) -> dict[str, Any]:
    """The init's options: its defaults updated by `config.init_options` (checked)."""
    defaults = OPTIONS.get(config.init, {})
    given = dict(config.init_options)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) or "none"
        raise JftError(f"unknown init_options {unknown} for lora init {config.init!r}; "
                       f"valid: {valid}")
    opts = {**defaults, **given}
    if config.init == "pissa" and opts["niter"] is not None and int(opts["niter"]) < 0:
        raise JftError(f"pissa niter must be >= 0, got {opts['niter']}")
    if config.init == "eva" and float(opts["rho"]) < 1.0:
        raise JftError(f"eva rho must be >= 1, got {opts['rho']}")
    if config.init == "corda" and opts["corda_method"] not in ("ipm", "kpm"):
        raise JftError(f"corda_method must be 'ipm' or 'kpm', got {opts['corda_method']!r}")
    if config.init == "loftq":
        steps = opts["loftq_iter"]
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise JftError(f"loftq_iter must be an integer >= 1, got {steps!r}")
    if config.init == "loraga":
        if opts["direction"] not in _DIRECTIONS:
            raise JftError(f"loraga direction {opts['direction']!r}; valid: {_DIRECTIONS}")
        if opts["scale"] not in _SCALES:
            raise JftError(f"loraga scale {opts['scale']!r}; valid: {_SCALES}")
    return opts


def init(key: jax.Array, base: dict, model: ModelConfig, config: LoraConfig,
         calibration_batches: Sequence[dict] | None = None) -> dict:
    """The delta of a data-driven init (`config.init` in pissa, eva, corda, loraga)."""
    opts = options(config)
    if config.init == "loftq":
        raise JftError(_loftq_refusal())
    with jax.default_matmul_precision("highest"):
        if config.init == "pissa":
            factors = _pissa(key, base, model, config, opts["niter"])
        elif config.init == "eva":
            batches = _batches(calibration_batches, "eva")
            if float(opts["rho"]) > 1.0:
                raise JftError(
                    f"eva rho={opts['rho']} redistributes ranks across layers, which changes "
                    "the config: build the adapter with jft.peft.create('lora', ..., "
                    "init='eva'), which returns the new config, or set init_options rho=1"
                )
            state = _eva_statistics(base, model, config, batches, 1.0)
            factors = _eva_factors(model, config, state)
        elif config.init == "corda":
            factors = _corda(base, model, config, _batches(calibration_batches, "corda"),
                             opts["corda_method"])
        elif config.init == "loraga":
            factors = _loraga(key, base, model, config, _batches(calibration_batches, "loraga"),
                              opts)
        else:
            raise JftError(f"lora init {config.init!r} is not data-driven")
    return _assemble(base, model, config, factors, record=config.init != "eva")


# ---------------------------------------------------------------- PiSSA


def _pissa(key, base, model, config, niter):
    factors = {}
    for module, p in plan(model, config).items():
        key, sub = jax.random.split(key)
        site = linear_site(model, module)
        factors[module] = _pissa_factors(site.to_in_out(base["layers"][module], lead=1),
                                         _safe_scales(p), sub,
                                         in_axes=len(site.in_axes), rank=p.max_rank,
                                         niter=None if niter is None else int(niter))
    return factors


@partial(jax.jit, static_argnames=("in_axes", "rank", "niter"))
def _pissa_factors(weight, scales, key, *, in_axes, rank, niter):
    w = _as_matrices(weight, in_axes)  # [L, in, out]
    if niter is None:
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    else:
        keys = jax.random.split(key, w.shape[0])
        u, s, vt = jax.vmap(partial(svd_lowrank, q=rank, niter=niter))(keys, w)
    u, s, vt = u[..., :rank], s[..., :rank], vt[..., :rank, :]
    root = jnp.sqrt(s / scales[:, None])  # PEFT: S_r /= scaling
    return u * root[:, None, :], root[:, :, None] * vt


def svd_lowrank(key: jax.Array, w: jax.Array, q: int, niter: int):
    """torch.svd_lowrank (Halko et al. 2009, algorithm 5.1): an approximate rank-q SVD
    (u [m, q], s [q], vt [q, n]) from a random range finder with `niter` subspace
    iterations."""
    transposed = w.shape[0] < w.shape[1]
    if transposed:  # torch assumes a tall matrix
        w = w.T
    basis = jnp.linalg.qr(w @ jax.random.normal(key, (w.shape[1], q), w.dtype))[0]
    for _ in range(niter):
        basis = jnp.linalg.qr(w.T @ basis)[0]
        basis = jnp.linalg.qr(w @ basis)[0]
    u, s, vt = jnp.linalg.svd(basis.T @ w, full_matrices=False)
    u = basis @ u
    if transposed:
        return vt.T, s, u.T
    return u, s, vt


# ---------------------------------------------------------------- LoftQ

LOFTQ_NEEDS_QUANTIZED = "init: loftq needs a quantized base (quantize: nf4|fp4|int8)"


def _loftq_refusal() -> str:
    return (f"{LOFTQ_NEEDS_QUANTIZED}, and runs as the base is quantized, from its float "
            "weights (which a quantized base no longer has): set quantize in the run's "
            "config, or call jft.load(model, quantize='nf4', loftq=lora_config), whose "
            "LoRA adapter comes first in Model.adapters")


def loftq_params(base: dict, model: ModelConfig, config: LoraConfig, spec) -> tuple[dict, dict]:
    """`init: loftq` from the float base: (the quantized base, the LoRA delta).

    Every targeted site's weight is quantized by LoftQ (`jft.quant.loftq`, with
    `loftq_iter` steps, each layer at its own rank and scale), the other linear sites
    (and the embeddings where `spec.embeddings`) as plain quantization does
    (`spec.quantize(weight_to_matrix(site, w, lead=1), group_ndim=1)`); leaves already
    quantized are kept. `spec`: the base's `QuantizeSpec` (None: refused). The delta
    records the initial factors (`init_a` / `init_b`) as PiSSA's does, so exports over
    the original float base are W + s (A B - A0 B0).
    """
    from jft.quant.loftq import loftq_weight
    from jft.quant.params import weight_to_matrix
    from jft.quant.tensor import is_quantized

    if config.init != "loftq":
        raise JftError(f"loftq_params is for lora init 'loftq', not {config.init!r}")
    if spec is None:
        raise JftError(_loftq_refusal())
    iterations = int(options(config)["loftq_iter"])
    plans = plan(model, config)
    sites = {site.name: site for site in linear_sites(model)}
    layers, factors = dict(base["layers"]), {}
    for name, weight in base["layers"].items():
        if name not in sites:
            continue  # norms, biases
        site = sites[name]
        if name in plans:
            if is_quantized(weight):
                raise JftError(f"init: loftq needs the float weights of {name}, which is "
                               "already quantized")
            p = plans[name]
            result = loftq_weight(site, weight, spec, p.ranks, p.scales, iterations, lead=1,
                                  width=p.max_rank)
            layers[name], factors[name] = result.quantized, (result.a, result.b)
        elif not is_quantized(weight):
            layers[name] = spec.quantize(
                weight_to_matrix(site, np.asarray(weight, np.float32), lead=1), group_ndim=1)
    top = {key: spec.quantize(np.asarray(value, np.float32))
           if spec.quantizes((key,), sites) and not is_quantized(value) else value
           for key, value in base.items() if key != "layers"}
    quantized = {**top, "layers": layers}
    return quantized, loftq_delta(quantized, model, config, factors)


def loftq_delta(quantized_base: dict, model: ModelConfig, config: LoraConfig,
                factors: dict) -> dict:
    """The delta of `init: loftq` from per-module factors a [L, *in, R], b [L, R, *out]
    (`LoftQResult.a` / `.b` of a stacked weight, or per-layer ones stacked), with the
    initial factors recorded. DoRA's magnitude is that of the model's initial weight,
    dequantize(Q) + s A B (read from `quantized_base`, only under DoRA)."""
    from jft.quant.params import dequantize_weight
    from jft.quant.tensor import is_quantized

    flat, initial = {}, {}
    for module, p in plan(model, config).items():
        site = linear_site(model, module)
        size_in, size_out = site.sizes(model)
        a = np.asarray(factors[module][0], np.float32).reshape(model.num_layers, size_in, -1)
        b = np.asarray(factors[module][1], np.float32).reshape(model.num_layers, -1, size_out)
        if a.shape[-1] != p.max_rank or b.shape[1] != p.max_rank:
            raise JftError(f"loftq factors of {module} have rank {a.shape[-1]}, "
                           f"not the plan's {p.max_rank}")
        flat[module] = (jnp.asarray(a), jnp.asarray(b))
        if config.dora:
            weight = quantized_base["layers"][module]
            dims_in = site.dims(model)[0]
            if is_quantized(weight):
                weight = dequantize_weight(site, weight, dims_in, jnp.float32, lead=1)
            values = site.to_in_out(jnp.asarray(weight, jnp.float32), lead=1)
            scales = np.asarray(p.scales, np.float32)[:, None, None]
            product = (scales * (a @ b)).reshape(values.shape)
            initial[module] = site.from_in_out(values + product, lead=1)
    return _assemble({"layers": initial}, model, config, flat, record=True)


# ---------------------------------------------------------------- calibration statistics


def _batches(batches, init_name):
    return prepare_calibration(batches, f"lora init {init_name!r}")


def prepare_calibration(batches, user: str):
    """(tokens, segment_ids, loss_mask) arrays of each calibration batch, checked; `user`
    (e.g. "lora init 'eva'") names what needs them in the errors."""
    batches = list(batches or ())
    if not batches:
        raise JftError(f"{user} needs calibration_batches "
                       "(dicts with 'tokens' [B, T] and optional 'segment_ids')")
    prepared = []
    for batch in batches:
        if not isinstance(batch, dict) or "tokens" not in batch:
            raise JftError("each calibration batch must be a dict with 'tokens' [B, T]")
        tokens = jnp.asarray(batch["tokens"], jnp.int32)
        if tokens.ndim != 2:
            raise JftError(f"calibration 'tokens' must be [B, T], got shape {tokens.shape}")
        segments = batch.get("segment_ids")
        segments = (jnp.ones_like(tokens) if segments is None
                    else jnp.asarray(segments, jnp.int32))
        loss_mask = batch.get("loss_mask")
        loss_mask = (jnp.ones(tokens.shape, bool) if loss_mask is None
                     else jnp.asarray(loss_mask, bool))
        if segments.shape != tokens.shape or loss_mask.shape != tokens.shape:
            raise JftError("calibration 'segment_ids' / 'loss_mask' must match 'tokens' shape")
        prepared.append((tokens, segments, loss_mask))
    return prepared


class _CapturingHooks(LayerHooks):
    """A plain (adapter-free) layer that keeps each linear's input."""

    def __init__(self, model, index):
        super().__init__(model, index, ())
        self.inputs = {}

    def linear(self, site, x, layer):
        self.inputs[site.name] = x
        return super().linear(site, x, layer)


@partial(jax.jit, static_argnums=0)
def _embed(model, table, tokens):
    """The residual stream entering layer 0, as `forward` computes it."""
    return embed(model, {"embed": table}, tokens)


@partial(jax.jit, static_argnames=("model", "groups", "kind"))
def _layer_step(layer, index, is_sliding, x, segment_ids, stat_mask, *, model, groups, kind):
    """One decoder layer of `forward` (no cache, no adapters): its output, and the
    statistics of the inputs of the linears in `groups`."""
    hooks = _CapturingHooks(model, index)
    x, _ = decoder_layer(model, layer, x, is_sliding, packed_layer_inputs(model, segment_ids),
                         hooks)
    stats = {}
    for group in groups:
        inputs = hooks.inputs[group]
        rows = inputs.reshape(-1, math.prod(inputs.shape[2:])).astype(jnp.float32)
        keep = stat_mask.reshape(-1, 1)
        if kind == "eva":  # count, mean, centred scatter of the kept rows
            count = jnp.sum(keep, dtype=jnp.float32)
            mean = jnp.sum(jnp.where(keep, rows, 0), axis=0) / jnp.maximum(count, 1.0)
            centred = jnp.where(keep, rows - mean, 0)
            stats[group] = (count, mean, centred.T @ centred)
        elif kind == "magnitude":  # summed |x| per input feature (S2FT's activation scores)
            stats[group] = jnp.sum(jnp.where(keep, jnp.abs(rows), 0), axis=0)
        else:  # CorDA: X^T X of the batch scaled by its largest entry (PEFT's hook)
            top = jnp.max(jnp.where(keep, rows, -jnp.inf))
            scaled = jnp.where(keep, rows / jnp.abs(top), 0)
            stats[group] = scaled.T @ scaled
    return x, stats


def _layer_statistics(base, model, batches, groups, kind, last_layer, label_mask=False):
    """Yields (layer, {input group: statistics over all batches}), layer by layer.

    Layer-major: every batch's residual stream is kept between layers, so only one
    layer's [in, in] statistics exist at a time."""
    hidden = [_embed(model, base["embed"], tokens) for tokens, _, _ in batches]
    for layer in range(last_layer + 1):
        params = _layer_params(base["layers"], jnp.int32(layer))
        sliding = model.layer_types[layer] == "sliding"
        total = None
        for i, (_, segments, loss_mask) in enumerate(batches):
            keep = (segments != 0) & loss_mask if label_mask else segments != 0
            hidden[i], stats = _layer_step(params, jnp.int32(layer), sliding, hidden[i],
                                           segments, keep, model=model, groups=groups,
                                           kind=kind)
            total = stats if total is None else {
                g: _merge_moments(total[g], stats[g]) if kind == "eva" else total[g] + stats[g]
                for g in groups
            }
        yield layer, total


def input_magnitudes(base, model, batches, modules):
    """Yields (layer, {module: summed |input| per input feature [in]}) over the prepared
    `batches`, layer by layer (real tokens only)."""
    last = model.num_layers - 1
    yield from _layer_statistics(base, model, batches, tuple(modules), "magnitude", last)


@jax.jit
def _layer_params(layers, index):
    return jax.tree.map(lambda w: w[index], layers)


@jax.jit
def _merge_moments(first, second):
    """Count, mean and centred scatter of two sets of rows together (Chan et al.)."""
    n1, m1, s1 = first
    n2, m2, s2 = second
    n = n1 + n2
    step = m2 - m1
    weight = jnp.where(n > 0, n2 / jnp.maximum(n, 1.0), 0.0)
    return n, m1 + step * weight, s1 + s2 + jnp.outer(step, step) * n1 * weight


def _groups(model, modules):
    """The input groups of `modules`, in the model's declaration order."""
    names = [site.name for site in linear_sites(model)]
    return tuple(sorted({input_group(model, m) for m in modules}, key=names.index))


# ---------------------------------------------------------------- EVA


@dataclasses.dataclass
class EvaStatistics:
    """Per (module, layer): the input's principal directions `components` [k, in] (rows,
    sign-fixed as sklearn's svd_flip), their `explained_variance_ratio` [k] and the
    centred data's `singular_values` [k]; `ranks` the config's rank per (module, layer)
    and `budget` their sum (what the redistribution shares out)."""

    components: dict[tuple[str, int], np.ndarray]
    explained_variance_ratio: dict[tuple[str, int], np.ndarray]
    singular_values: dict[tuple[str, int], np.ndarray]
    ranks: dict[tuple[str, int], int]
    max_components: dict[tuple[str, int], int]
    # Every linear of the model, in declaration order -> the first one reading its input.
    input_groups: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def budget(self) -> int:
        return sum(self.ranks.values())


def eva_statistics(base: dict, model: ModelConfig, config: LoraConfig,
                   calibration_batches, rho: float = 1.0) -> EvaStatistics:
    """The principal directions of each targeted linear's inputs, up to round(r * rho)
    of them (PEFT's `max_components`, equalised across linears that share an input)."""
    return _eva_statistics(base, model, config, _batches(calibration_batches, "eva"), rho)


def _eva_statistics(base, model, config, batches, rho):
    opts = options(dataclasses.replace(config, init="eva"))
    plans = plan(model, config)
    ranks, wanted, limits = {}, {}, {}
    if rho > 1000:  # PEFT's ceiling for very large rho
        max_dim = max(max(leaf.shape) for leaf in jax.tree.leaves(base))
        rho = min(rho, max_dim // config.r)
    groups = {site.name: input_group(model, site.name) for site in linear_sites(model)}
    for module, p in plans.items():
        limit = min(linear_site(model, module).sizes(model))
        for layer, r in enumerate(p.ranks):
            if r:
                ranks[module, layer], limits[module, layer] = r, limit
                wanted[module, layer] = round(r * rho)
    for layer in range(model.num_layers):  # shared inputs: the same max_components
        for group in set(groups.values()):
            members = [m for m in plans if groups[m] == group and (m, layer) in wanted]
            if members:
                top = max(wanted[m, layer] for m in members)
                for m in members:  # but no rank above what plan() allows
                    wanted[m, layer] = min(top, limits[m, layer])
    components, ratios, singular = {}, {}, {}
    last = max(layer for _, layer in ranks)
    for layer, stats in _layer_statistics(base, model, batches, _groups(model, plans), "eva", last,
                                          label_mask=bool(opts["use_label_mask"])):
        decomposed = {}
        for module in plans:
            if (module, layer) not in ranks:
                continue
            group = groups[module]
            count, _, scatter = stats[group]
            k = wanted[module, layer]
            if float(count) < k:
                raise JftError(f"eva: {int(count)} calibration tokens for "
                               f"model.layers.{layer}.{module}, fewer than the {k} components")
            if group not in decomposed:
                k_group = max(wanted[m, layer] for m in plans
                              if groups[m] == group and (m, layer) in wanted)
                decomposed[group] = [np.asarray(x)
                                     for x in _principal_directions(scatter, k_group)]
            rows, ratio, sv = decomposed[group]
            components[module, layer], ratios[module, layer] = rows[:k], ratio[:k]
            singular[module, layer] = sv[:k]
    return EvaStatistics(components, ratios, singular, ranks, wanted, groups)


@partial(jax.jit, static_argnums=1)
def _principal_directions(scatter, k):
    """The top-k eigenvectors (rows, sign-fixed as sklearn's svd_flip) of a centred
    scatter matrix, their explained-variance ratios and the data's singular values."""
    values, vectors = jnp.linalg.eigh(scatter)
    values = jnp.maximum(values[::-1], 0.0)  # descending
    rows = vectors[:, ::-1].T[:k]
    pivot = jnp.take_along_axis(rows, jnp.argmax(jnp.abs(rows), axis=1)[:, None], axis=1)
    return rows * jnp.sign(pivot), values[:k] / jnp.sum(values), jnp.sqrt(values[:k])


def eva_redistribute(state: EvaStatistics) -> dict[tuple[str, int], int]:
    """PEFT's EVA rank redistribution: the `budget` (sum of the configured ranks) goes to
    the (module, layer)s owning the globally largest explained-variance ratios, each
    offering at most its `max_components`; among linears sharing an input, the first
    (q_proj, gate_proj) gets the largest count."""
    keys, values = [], []
    order = list(state.input_groups)
    for key in sorted(state.ranks, key=lambda k: (k[1], order.index(k[0]))):
        ratio = state.explained_variance_ratio[key][: state.max_components[key]]
        keys += [key] * len(ratio)
        values.append(ratio)
    order = np.argsort(-np.concatenate(values), kind="stable")[: state.budget]
    counts = Counter(keys[i] for i in order)
    counts = {key: counts.get(key, 0) for key in state.ranks}
    for module, layer in counts:
        hook = (state.input_groups[module], layer)
        if hook != (module, layer) and hook in counts and counts[hook] < counts[module, layer]:
            counts[hook], counts[module, layer] = counts[module, layer], counts[hook]
    return counts


def eva_config(model: ModelConfig, config: LoraConfig, state: EvaStatistics,
               ranks: dict[tuple[str, int], int]) -> LoraConfig:
    """`config` with the redistributed `ranks` as a per-layer `rank_pattern` (and, with
    `adjust_scaling_factors`, alpha * new_rank / old_rank as `alpha_pattern`, PEFT's
    rule), and `rho` set back to 1: the redistribution is now part of the config."""
    opts = options(config)
    rank_entries, alpha_entries = [], []
    for (module, layer), new_rank in sorted(ranks.items(),
                                            key=lambda kv: (kv[0][1], kv[0][0])):
        key = linear_site(model, module).path(layer)  # as PEFT's EVA writes its rank_pattern
        rank_entries.append((key, int(new_rank)))
        if opts["adjust_scaling_factors"] and new_rank != state.ranks[module, layer]:
            alpha = _alpha(model, config, module, layer)
            alpha_entries.append((key, alpha * new_rank / state.ranks[module, layer]))
    new_options = dict(config.init_options, rho=1.0)
    return dataclasses.replace(
        config,
        rank_pattern=tuple(rank_entries) + tuple(config.rank_pattern),
        alpha_pattern=tuple(alpha_entries) + tuple(config.alpha_pattern),
        init_options=tuple(sorted(new_options.items())),
    )


def _alpha(model, config, module, layer):
    """The alpha plan() uses for one layer's module (read back from its scale)."""
    p = plan(model, config)[module]
    r = p.ranks[layer]
    return p.scales[layer] * (math.sqrt(r) if config.rslora else r)


def init_eva(key: jax.Array, base: dict, model: ModelConfig, config: LoraConfig,
             calibration_batches) -> tuple[LoraConfig, dict]:
    """EVA with PEFT's rank redistribution (`rho` from init_options; PEFT's default is
    2): (the config with the new per-layer ranks, its delta), in one calibration pass.
    With rho = 1 the config comes back unchanged."""
    del key  # EVA is deterministic
    config = dataclasses.replace(config, init="eva")
    rho = float(options(config)["rho"])
    with jax.default_matmul_precision("highest"):
        state = _eva_statistics(base, model, config, _batches(calibration_batches, "eva"), rho)
    if rho > 1.0:
        config = eva_config(model, config, state, eva_redistribute(state))
    return config, _assemble(base, model, config, _eva_factors(model, config, state),
                             record=False)


def _eva_factors(model, config, state):
    whiten = bool(options(config)["whiten"])
    factors = {}
    for module, p in plan(model, config).items():
        size_in, size_out = linear_site(model, module).sizes(model)
        a = np.zeros((model.num_layers, size_in, p.max_rank), np.float32)
        for layer, r in enumerate(p.ranks):
            if r == 0:
                continue
            rows = state.components[module, layer][:r]
            if len(rows) < r:
                raise JftError(f"eva: rank {r} for model.layers.{layer}.{module} exceeds the "
                               f"{len(rows)} directions computed")
            if whiten:
                rows = rows / np.sqrt(np.maximum(state.singular_values[module, layer][:r],
                                                 np.finfo(np.float32).tiny))[:, None]
            a[layer, :, :r] = rows.T
        b = np.zeros((model.num_layers, p.max_rank, size_out), np.float32)
        factors[module] = (jnp.asarray(a), jnp.asarray(b))
    return factors


# ---------------------------------------------------------------- CorDA


def _corda(base, model, config, batches, method):
    plans = plan(model, config)
    out = {}
    for module, p in plans.items():
        size_in, size_out = linear_site(model, module).sizes(model)
        out[module] = (np.zeros((model.num_layers, size_in, p.max_rank), np.float32),
                       np.zeros((model.num_layers, p.max_rank, size_out), np.float32))
    last = max(layer for p in plans.values() for layer, r in enumerate(p.ranks) if r)
    for layer, stats in _layer_statistics(base, model, batches, _groups(model, plans), "corda",
                                          last):
        regularised = {}
        for module, p in plans.items():
            r = p.ranks[layer]
            if r == 0:
                continue
            group = input_group(model, module)
            if group not in regularised:
                regularised[group] = _corda_regularise(stats[group] / len(batches))
            fixed, inverse = regularised[group]
            site = linear_site(model, module)
            a, b = _corda_factors(fixed, inverse, site.to_in_out(base["layers"][module], lead=1),
                                  jnp.int32(layer), jnp.float32(p.scales[layer]),
                                  in_axes=len(site.in_axes), rank=r,
                                  kpm=method == "kpm")
            out[module][0][layer, :, :r] = np.asarray(a)
            out[module][1][layer, :r] = np.asarray(b)
    return {m: (jnp.asarray(a), jnp.asarray(b)) for m, (a, b) in out.items()}


def _corda_regularise(covariance):
    """PEFT's damping: C + damp * mean(diag C) * I, damp = 0.01, doubled until the
    inverse is good to 0.05 (Frobenius norm of C_fixed C_fixed^-1 - I)."""
    damp = 0.01
    while True:
        fixed, inverse, error = _damped_inverse(covariance, jnp.float32(damp))
        error = float(error)
        if math.isfinite(error) and error < 0.05:
            return fixed, inverse
        damp *= 2
        if damp > 1e12:
            raise JftError("corda: the input covariance cannot be regularised to invertible")


@jax.jit
def _damped_inverse(covariance, damp):
    eye = jnp.eye(covariance.shape[0], dtype=jnp.float32)
    fixed = covariance + eye * jnp.mean(jnp.diag(covariance)) * damp
    inverse = jnp.linalg.inv(fixed)
    return fixed, inverse, jnp.linalg.norm(fixed @ inverse - eye)


@partial(jax.jit, static_argnames=("in_axes", "rank", "kpm"))
def _corda_factors(fixed, inverse, weight, layer, scale, *, in_axes, rank, kpm):
    w = _as_matrices(weight, in_axes)[layer]
    u, s, vt = jnp.linalg.svd(fixed @ w, full_matrices=False)  # C W = (W_t C)^T
    chosen = slice(s.shape[0] - rank, s.shape[0]) if kpm else slice(0, rank)
    root = jnp.sqrt(s[chosen] / scale)
    a = (inverse.T @ u[:, chosen]) * root  # PEFT's V = (Vh C^-1)^T
    return a, root[:, None] * vt[chosen]


# ---------------------------------------------------------------- LoRA-GA


@partial(jax.jit, static_argnums=0)
def _weight_gradients(model, weights, base, tokens, segment_ids, loss_mask):
    """d loss / d W of the weights named in `weights`, the loss being training's own
    (`jft.objectives.sft`: next-token cross-entropy on the target tokens)."""
    from jft.objectives.sft import SFT

    batch = {"tokens": tokens, "segment_ids": segment_ids, "loss_mask": loss_mask,
             "positions": None}

    def loss(weights):
        params = dict(base, layers=dict(base["layers"], **weights))
        return SFT.loss(model, params, (), batch, None)[0]

    return jax.grad(loss)(weights)


def loraga_gradients(base, model, config, calibration_batches) -> dict[str, jax.Array]:
    """module -> the mean over batches of d loss / d W [L, *in, *out] (float32), for the
    targeted modules (PEFT's `preprocess_loraga` with one backward per batch)."""
    return _loraga_gradients(base, model, config, _batches(calibration_batches, "loraga"))


def _loraga_gradients(base, model, config, batches):
    return mean_weight_gradients(base, model, tuple(plan(model, config)), batches)


def mean_weight_gradients(base, model, modules, batches) -> dict[str, jax.Array]:
    """module -> the mean over prepared `batches` (see `_batches`) of d loss / d W."""
    weights = {m: base["layers"][m] for m in modules}
    total = None
    for tokens, segments, loss_mask in batches:
        grads = _weight_gradients(model, weights, base, tokens, segments, loss_mask)
        grads = {m: g.astype(jnp.float32) for m, g in grads.items()}
        total = grads if total is None else {m: total[m] + grads[m] for m in grads}
    return {m: g / len(batches) for m, g in total.items()}


def _loraga(key, base, model, config, batches, opts):
    for module, p in plan(model, config).items():
        limit = min(linear_site(model, module).sizes(model))
        if 2 * p.max_rank > limit:
            raise JftError(f"loraga takes 2r singular components, so it needs 2r <= {limit} "
                           f"for {module}, got r={p.max_rank}")
    gradients = _loraga_gradients(base, model, config, batches)
    factors = {}
    for module, p in plan(model, config).items():
        site = linear_site(model, module)
        size_in, size_out = site.sizes(model)
        a = np.zeros((model.num_layers, size_in, p.max_rank), np.float32)
        b = np.zeros((model.num_layers, p.max_rank, size_out), np.float32)
        for layer, r in enumerate(p.ranks):
            if r == 0:
                continue
            key, sub = jax.random.split(key)
            a_l, b_l = _loraga_factors(
                site.to_in_out(gradients[module], lead=1),
                site.to_in_out(base["layers"][module], lead=1), jnp.int32(layer),
                jnp.float32(p.scales[layer]), sub, in_axes=len(site.in_axes), rank=r,
                direction=opts["direction"], scale=opts["scale"],
                gamma=float(opts["stable_gamma"]))
            a[layer, :, :r], b[layer, :r] = np.asarray(a_l), np.asarray(b_l)
        factors[module] = (jnp.asarray(a), jnp.asarray(b))
    return factors


@partial(jax.jit, static_argnames=("in_axes", "rank", "direction", "scale", "gamma"))
def _loraga_factors(gradient, weight, layer, scaling, key, *, in_axes, rank, direction, scale,
                    gamma):
    """PEFT's lora_ga_init for one layer, on G = U S V^T (exact SVD)."""
    grad = _as_matrices(gradient, in_axes)[layer]
    u, s, vt = jnp.linalg.svd(grad, full_matrices=False)
    r = rank
    if direction == "ArB2r":  # A: components [0, r), B: [r, 2r)
        pick_a, pick_b = np.arange(r), np.arange(r, 2 * r)
    elif direction == "A2rBr":
        pick_a, pick_b = np.arange(r, 2 * r), np.arange(r)
    elif direction == "ArBr":  # A the odd components, B the even ones
        pick_a, pick_b = np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2)
    else:  # random: the same r of the first 2r for both
        pick_a = pick_b = jax.random.permutation(key, 2 * r)[:r]
    a, s_b = u[:, pick_a], s[pick_b]
    b = s_b[:, None] * vt[pick_b]
    if scale == "stable":
        b = b * grad.shape[1] ** 0.25 / math.sqrt(gamma)
    elif scale == "weight_svd":
        top = jnp.linalg.svd(_as_matrices(weight, in_axes)[layer], compute_uv=False)[0]
        b = jnp.where(s_b[0] > 0, b * top / s_b[0], b)
    elif scale == "gd_scale":
        a, b = a / scaling, b / scaling
    return a, b


# ---------------------------------------------------------------- shared


def _as_matrices(weight, in_axes):
    """A stacked weight in the in-out layout [L, *in, *out] (`LinearSite.to_in_out`) as
    float32 matrices [L, in, out]."""
    size_in = math.prod(weight.shape[1:1 + in_axes])
    return weight.astype(jnp.float32).reshape(weight.shape[0], size_in, -1)


def _safe_scales(p):
    return jnp.asarray([s if s else 1.0 for s in p.scales], jnp.float32)


@partial(jax.jit, static_argnames=("dims_in", "dims_out"))
def _layout(a, b, mask, *, dims_in, dims_out):
    """[L, in, R], [L, R, out] -> [L, *in, R], [L, R, *out], zero beyond each rank."""
    a = (a * mask[:, None, :]).reshape(a.shape[0], *dims_in, a.shape[2])
    b = (b * mask[:, :, None]).reshape(b.shape[0], b.shape[1], *dims_out)
    return a, b


def _assemble(base, model, config, factors, record):
    """The delta from per-module factors a [L, in, R], b [L, R, out]: reshaped to jft's
    layout, zero beyond each layer's rank, initial factors recorded if `record`."""
    layers = {}
    for module, p in plan(model, config).items():
        site = linear_site(model, module)
        dims_in, dims_out = site.dims(model)
        a, b = _layout(*factors[module], jnp.asarray(p.rank_mask(), jnp.float32),
                       dims_in=dims_in, dims_out=dims_out)
        entry = {"a": a, "b": b}
        if record:
            entry["init_a"], entry["init_b"] = jnp.array(a, copy=True), jnp.array(b, copy=True)
        if config.dora:  # of W = (rebased base) + s A0 B0, so the model starts unchanged
            entry["magnitude"] = _column_norm(site, base["layers"][module])
        layers[module] = entry
    return {"layers": layers}
