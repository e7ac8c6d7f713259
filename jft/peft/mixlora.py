"""MixLoRA (Li et al. 2024, arXiv 2404.15159): a dense model's feed-forward becomes top-k
routed LoRA experts that share its frozen MLP, and the attention gets plain LoRA.

Expert i is the dense SwiGLU MLP with LoRA deltas of its own on gate (W1), up (W3) and
down (W2), ΔW = (alpha / r) A B:

    E_i(x) = (W2 + ΔW2ⁱ) [act((W1 + ΔW1ⁱ) x) ⊙ (W3 + ΔW3ⁱ) x]

A router W_g [D, N] (no bias, N(0, `router_init_std`) at init, trainable) scores the N
experts; the top k of softmax(x W_g) are kept and renormalised to sum to 1, and
y = Σ_{i ∈ top-k} p̂_i E_i(x). With every B zero at init, each expert is the dense MLP, so
the adapter starts as the identity. `jitter` > 0 multiplies the layer's input by
U(1 - jitter, 1 + jitter) in training (router and experts), as the reference code does.

The balance loss (Switch / Mixtral form) is `aux_loss_coef` N Σ_i f_i P_i per layer, f_i
the (token, top-k slot) assignments to expert i per real token (`valid`), P_i the mean
router probability of expert i; each layer reports it divided by the layer count, so the
forward's sum over layers is its mean over layers (the reference code pools all layers'
counts first; under balanced routing both are k · coef). It reaches the objective as the
aux entry "mixlora/aux_loss", already weighted.

Efficiency (the paper's trick): W1 x and W3 x are computed once per token through the
layer's own linears (so adapters stacked on the MLP's linears apply to the shared MLP);
the (token, choice) rows are sorted by expert (`moe.dispatch`), each expert's LoRA deltas
are grouped matmuls over its own rows (`grouped.grouped_matmul`), and W2 runs once per
routed row. The attention projections in `attention_targets` get ordinary LoRA (`lora.py`,
with this config's r, alpha and dropout).

The delta: `router` [L, D, N]; `experts[module]` `a` [L, N, *in, r] and `b` [L, N, r, *out]
for each of `expert_targets`; `attention[module]` LoRA's `a` [L, *in, r], `b` [L, r, *out].
Routing makes the function no single weight can express: `merge` refuses, and so does
an MoE base (its feed-forward is routed experts already).
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache

import jax
import jax.numpy as jnp

from jft.errors import ConfigValueError, JftError
from jft.models import ModelConfig
from jft.models.grouped import grouped_matmul
from jft.models.moe import combine, dispatch, load_balancing_loss, route, router_stats
from jft.models.sites import linear_site, linear_sites
from jft.models.transformer import activation
from jft.peft.base import MethodBase, Targets, register
from jft.peft.lora import LORA, LoraConfig
from jft.sharding.logical import constrain

MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
AUX_KEY = "mixlora/aux_loss"
_JITTER_STREAM = 7919  # folded into the layer's dropout key: the jitter's own stream
_DROPOUT_STREAM = 7920  # + the module's index in MLP_MODULES: each expert factor's dropout


@dataclasses.dataclass(frozen=True)
class MixLoraConfig:
    """The paper's defaults (code: TUDB-Labs/MixLoRA): 8 experts, top-2, r 8, alpha 16,
    dropout 0.05, balance-loss weight 0.001, router init std 0.02, no jitter, experts on
    gate/up/down and LoRA on q/v."""

    num_experts: int = 8
    top_k: int = 2
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    aux_loss_coef: float = 0.001
    router_init_std: float = 0.02
    jitter: float = 0.0
    expert_targets: tuple[str, ...] = MLP_MODULES
    attention_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        for name in ("expert_targets", "attention_targets"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)
            object.__setattr__(self, name, value)
        for name in ("num_experts", "top_k", "r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise JftError(f"mixlora {name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise JftError(f"mixlora top_k {self.top_k} exceeds num_experts "
                           f"{self.num_experts}; top_k must be at most num_experts")
        for name in ("alpha", "dropout", "aux_loss_coef", "router_init_std", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                    value) or value < 0:
                raise JftError(f"mixlora {name} must be a finite number >= 0, got {value!r}")
        if self.dropout >= 1.0 or self.jitter >= 1.0:
            name = "dropout" if self.dropout >= 1.0 else "jitter"
            raise JftError(f"mixlora {name} must be in [0, 1), got {getattr(self, name)}")
        _check_names("expert_targets", self.expert_targets, MLP_MODULES, allow_empty=False)
        _check_names("attention_targets", self.attention_targets, ATTENTION_MODULES)


def _check_names(option: str, names: tuple[str, ...], valid: tuple[str, ...],
                 allow_empty: bool = True) -> None:
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise JftError(f"mixlora {option} has {unknown[0]!r}; valid: {', '.join(valid)}")
    if len(set(names)) != len(names):
        raise JftError(f"mixlora {option} names a module twice: {list(names)}")
    if not names and not allow_empty:
        raise JftError(f"mixlora {option} is empty: experts without LoRA on any of "
                       f"{', '.join(valid)} would all be the same MLP")


@cache
def attention_lora(config: MixLoraConfig) -> LoraConfig | None:
    """The plain LoRA the attention projections get, or None."""
    if not config.attention_targets:
        return None
    return LoraConfig(r=config.r, alpha=config.alpha, targets=Targets(config.attention_targets),
                      dropout=config.dropout)


@cache
def check_model(model: ModelConfig, config: MixLoraConfig) -> None:
    """Refuses an MoE base, a model without a gated MLP, and a rank above a dimension."""
    if model.moe is not None:
        raise JftError(f"mixlora builds its experts from a dense model's MLP; this "
                       f"{model.family} model is a mixture of experts already: use lora "
                       "(its targets may include the experts) or a dense model")
    names = {site.name for site in linear_sites(model)}
    missing = [m for m in (*MLP_MODULES, *config.attention_targets) if m not in names]
    if missing:
        raise ConfigValueError("method.attention_targets" if missing[0] in ATTENTION_MODULES
                               else "method.expert_targets",
                               f"mixlora needs the linear {missing[0]!r}, which this "
                               f"{model.family} model does not have")
    limit = min(model.embed_dim, model.mlp_dim)
    if config.r > limit:
        raise ConfigValueError("method.r", f"mixlora r {config.r} exceeds the MLP's smaller "
                                           f"dimension {limit}")


class MixLora(MethodBase):
    name = "mixlora"
    Config = MixLoraConfig
    supports_moe = False  # it builds experts from a dense MLP (`check_model` says so)

    def init(self, key, base, model, config, calibration_batches=None):
        check_model(model, config)
        router_key, lora_key, *expert_keys = jax.random.split(key, 2 + len(config.expert_targets))
        num_layers, num_experts = model.num_layers, config.num_experts
        router = config.router_init_std * jax.random.normal(
            router_key, (num_layers, model.embed_dim, num_experts))
        experts = {}
        for module, expert_key in zip(config.expert_targets, expert_keys, strict=True):
            dims_in, dims_out = linear_site(model, module).dims(model)
            # PEFT's LoRA init per expert: Kaiming-uniform A (a = sqrt(5)), zero B.
            bound = 1.0 / math.sqrt(math.prod(dims_in))
            a = jax.random.uniform(expert_key, (num_layers, num_experts, *dims_in, config.r),
                                   minval=-bound, maxval=bound)
            b = jnp.zeros((num_layers, num_experts, config.r, *dims_out))
            experts[module] = {"a": a, "b": b}
        layers = {"router": router, "experts": experts}
        lora = attention_lora(config)
        if lora is not None:
            layers["attention"] = LORA.init(lora_key, base, model, lora)["layers"]
        return {"layers": layers}

    def wraps_linear(self, site, delta, delta_layer, config):
        return site.name in config.attention_targets

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        return LORA.linear(site, x, inner, delta, delta_layer["attention"], layer,
                           attention_lora(config))

    def wraps_feed_forward(self, delta, delta_layer, config):
        return True

    def feed_forward(self, h, inner, delta, delta_layer, layer, params, valid, config):
        """The experts on h [B, T, D]: (y [B, T, D], {"mixlora/aux_loss": this layer's
        share of the weighted balance loss}); `params` are the layer's."""
        model = layer.config
        sites = {site.name: site for site in linear_sites(model)}
        batch, length, dim = h.shape
        if config.jitter and layer.rng is not None:
            noise = jax.random.uniform(jax.random.fold_in(layer.rng, _JITTER_STREAM), h.shape,
                                       minval=1.0 - config.jitter, maxval=1.0 + config.jitter)
            h = (h * noise).astype(h.dtype)
        flat = h.reshape(batch * length, dim)  # [N, D]
        logits = jnp.dot(flat.astype(jnp.float32),
                         delta_layer["router"].astype(jnp.float32))  # [N, E]
        routing = route(logits, config.top_k, True, h.dtype)
        plan = dispatch(routing.experts, config.num_experts)
        rows = constrain(flat[plan.token], (("batch", "seq"), "embed"))  # [M = N k, D]
        # The shared dense W1 x and W3 x, once per token, then one row per (token, choice).
        gate = layer.linear(sites["gate_proj"], h, params).reshape(batch * length, -1)
        up = layer.linear(sites["up_proj"], h, params).reshape(batch * length, -1)
        gate = gate[plan.token] + self._expert_delta("gate_proj", rows, delta_layer, plan,
                                                     layer, config)  # [M, F]
        up = up[plan.token] + self._expert_delta("up_proj", rows, delta_layer, plan, layer,
                                                 config)
        hidden = constrain(activation(gate, model) * up, (("batch", "seq"), "mlp"))  # [M, F]
        out = layer.linear(sites["down_proj"], hidden[None], params)[0]  # [M, D]
        out = out + self._expert_delta("down_proj", hidden, delta_layer, plan, layer, config)
        y = combine(out, plan, routing.weights).reshape(batch, length, dim)
        balance = load_balancing_loss(router_stats(routing, valid, config.num_experts))
        return y, {AUX_KEY: config.aux_loss_coef * balance / model.num_layers}

    def _expert_delta(self, module, rows, delta_layer, plan, layer, config):
        """s (x A_e) B_e for each row x [M, in] and its expert e, or 0 where the experts
        have no LoRA on `module`."""
        if module not in config.expert_targets:
            return 0
        entry = delta_layer["experts"][module]  # a [E, in, r], b [E, r, out]
        x = rows
        if config.dropout and layer.rng is not None:
            key = jax.random.fold_in(layer.rng, _DROPOUT_STREAM + MLP_MODULES.index(module))
            keep = jax.random.bernoulli(key, 1.0 - config.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - config.dropout), 0).astype(rows.dtype)
        # The factors go in as stored (the grouped matmul casts them): its backward pass
        # then keeps the layer's slice of the delta, not a converted copy.
        xa = grouped_matmul(x, entry["a"], plan.group_sizes)  # [M, r]
        scale = jnp.asarray(config.alpha / config.r, x.dtype)
        return grouped_matmul(xa, entry["b"], plan.group_sizes) * scale  # [M, out]

    def merge(self, base, delta, model, config):
        raise JftError("mixlora cannot be merged into the base: each token's top-"
                       f"{config.top_k} of {config.num_experts} experts are chosen by its "
                       "router, which no single weight can express; keep it as an adapter "
                       "(export --format jft)")

    def unmerge(self, base, delta, model, config):
        raise JftError("mixlora is never merged into a base (routing), so it cannot be "
                       "unmerged; keep the base as it is")

    def identity(self, delta, base, model, config):
        """Zero B everywhere: every expert is the dense MLP, the attention is unchanged."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.zeros_like(x) if path[-1].key == "b" else x, delta)

    def delta_axes(self, delta, model, config):
        # Expert factors shard like their weight's inputs and outputs; the expert and rank
        # axes are small and stay replicated, as does the router's expert axis.
        layers = {"router": ("layers", "embed", None), "experts": {}}
        for module in delta["layers"]["experts"]:
            site = linear_site(model, module)
            layers["experts"][module] = {"a": ("layers", None, *site.in_axes, None),
                                         "b": ("layers", None, None, *site.out_axes)}
        if "attention" in delta["layers"]:
            attention = {"layers": delta["layers"]["attention"]}
            layers["attention"] = LORA.delta_axes(attention, model,
                                                  attention_lora(config))["layers"]
        return {"layers": layers}


MIXLORA = register(MixLora())
