"""Mixture-of-experts layers: the sites, routing, the expert FFN (grouped or dense), the
router's training losses, and the MoE decoder block that the MoE families register.

A layer's feed-forward is top-k routed experts: a router linear scores the E experts
per token, the top k are kept (their softmax probabilities, renormalised to sum to 1
where the family does), and the token's output is the weighted sum of those experts'
SwiGLU MLPs. Qwen2-MoE adds a shared expert (the model's dense MLP sites) every token
goes through, scaled by a sigmoid gate.

The experts' weights are stacked per layer, [E, D, 2, F] (gate and up fused, as
transformers 5 keeps them) and [E, F, D]. `RuntimePolicy.moe_impl` picks how they run:
- "grouped" (default): the (token, choice) rows are sorted by expert and each expert
  multiplies only its own rows (`grouped.grouped_matmul`); no capacity, nothing dropped.
- "dense": every token through every expert, unchosen experts weighted 0: E / k times
  the work, kept as the reference the grouped path is tested against.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jft.models.sites import TRANSFORMER_SITES, LinearSite
from jft.sharding.logical import constrain

ROUTER = LinearSite("router", "BTD,DE->BTE", ("embed",), ("experts",), "mlp.gate.weight",
                    "ffn_gate_inp", input="mlp_input", parameter=True)
EXPERTS_GATE_UP = LinearSite("experts_gate_up", "BTED,EDCF->BTECF", ("embed",),
                             ("gate_up", "expert_mlp"), "mlp.experts.gate_up_proj",
                             "ffn_gate_up_exps", experts=True, parameter=True)
EXPERTS_DOWN = LinearSite("experts_down", "BTEF,EFD->BTED", ("expert_mlp",), ("embed",),
                          "mlp.experts.down_proj", "ffn_down_exps", experts=True,
                          parameter=True)
SHARED_GATE = LinearSite("shared_expert_gate", "BTD,DU->BTU", ("embed",), ("unit",),
                         "mlp.shared_expert_gate", "ffn_gate_inp_shexp", input="mlp_input")


def _shared_expert_sites() -> tuple[LinearSite, ...]:
    """The dense MLP's sites as Qwen2-MoE's shared expert (`mlp.shared_expert.*`)."""
    mlp = [s for s in TRANSFORMER_SITES if s.hf_path.startswith("mlp.")]
    return tuple(dataclasses.replace(s, hf_path=s.hf_path.replace("mlp.", "mlp.shared_expert."),
                                     gguf=s.gguf + "_shexp") for s in mlp)


ATTENTION_SITES = tuple(s for s in TRANSFORMER_SITES if s.hf_path.startswith("self_attn."))
ROUTED_SITES = (ROUTER, EXPERTS_GATE_UP, EXPERTS_DOWN)
SHARED_EXPERT_SITES = (*ATTENTION_SITES, *ROUTED_SITES, *_shared_expert_sites(), SHARED_GATE)


def moe_sites(moe) -> tuple[LinearSite, ...]:
    """The linears of an MoE layer, in call order."""
    shared = _shared_expert_sites() if moe.shared_expert else ()
    return (*ATTENTION_SITES, *ROUTED_SITES, *shared, *((SHARED_GATE,) if moe.shared_gate else ()))


# ---------------------------------------------------------------- routing


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Each token's chosen experts [N, k] and their weights [N, k] (x's dtype), with the
    router's float32 logits [N, E] for the training losses."""

    experts: jax.Array
    weights: jax.Array
    logits: jax.Array


def route(logits: jax.Array, top_k: int, normalize: bool, dtype) -> Routing:
    """Top-k of the softmax of router logits [N, E] (float32, as transformers routes)."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(experts, weights.astype(dtype), logits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dispatch:
    """The (token, choice) rows sorted by expert: `token` [N k] is each row's token,
    `group_sizes` [E] the rows per expert, `order` [N k] the sorted position of each
    unsorted (token, choice) pair."""

    token: jax.Array
    group_sizes: jax.Array
    order: jax.Array


def dispatch(experts: jax.Array, num_experts: int) -> Dispatch:
    """Sorts the rows of chosen experts [N, k] by expert (stable: by token within one)."""
    flat = experts.reshape(-1)
    sort = jnp.argsort(flat, stable=True)
    top_k = experts.shape[1]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return Dispatch(sort // top_k, group_sizes, jnp.argsort(sort))


def combine(rows: jax.Array, plan: Dispatch, weights: jax.Array) -> jax.Array:
    """Sorted expert outputs [N k, D] -> each token's weighted sum [N, D]."""
    tokens, top_k = weights.shape
    unsorted = rows[plan.order].reshape(tokens, top_k, -1)
    return jnp.einsum("NKD,NK->ND", unsorted, weights.astype(rows.dtype))


def swiglu(gate_up: jax.Array, activation) -> jax.Array:
    """[..., 2, F] (gate, up) -> act(gate) * up [..., F]."""
    return activation(gate_up[..., 0, :]) * gate_up[..., 1, :]


# ---------------------------------------------------------------- training losses


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterStats:
    """One layer's routing, summed over its real tokens: top-k assignments per expert
    [E], router probabilities per expert [E], tokens, and the sum of squared logsumexp
    of the logits (z-loss). Summed over layers they give transformers' load-balancing
    loss, which pools every layer's counts before normalising."""

    assignments: jax.Array
    probabilities: jax.Array
    tokens: jax.Array
    z_sum: jax.Array


def router_stats(routing: Routing, valid: jax.Array, num_experts: int) -> RouterStats:
    weight = valid.reshape(-1).astype(jnp.float32)  # [N]
    chosen = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32)  # [N, k, E]
    assignments = jnp.einsum("NKE,N->E", chosen, weight)
    probabilities = jnp.einsum("NE,N->E", jax.nn.softmax(routing.logits, axis=-1), weight)
    z = jnp.square(jax.nn.logsumexp(routing.logits, axis=-1))
    return RouterStats(assignments, probabilities, jnp.sum(weight), jnp.sum(z * weight))


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """E * sum_e f_e P_e over the pooled stats (transformers' `load_balancing_loss_func`):
    f_e the top-k assignments to expert e per token, P_e its mean router probability."""
    tokens = jnp.maximum(stats.tokens, 1.0)
    num_experts = stats.assignments.shape[-1]
    return num_experts * jnp.sum((stats.assignments / tokens) * (stats.probabilities / tokens))


def z_loss(stats: RouterStats) -> jax.Array:
    """ST-MoE's router z-loss: the mean over tokens (and layers) of logsumexp(logits)^2."""
    return stats.z_sum / jnp.maximum(stats.tokens, 1.0)


# ---------------------------------------------------------------- the feed-forward


def moe_feed_forward(config, layer, h, hooks, valid):
    """The routed experts (plus Qwen2-MoE's gated shared expert) on h [B, T, D]:
    (output [B, T, D], {"router": RouterStats})."""
    from jft.models.transformer import activation

    moe = config.moe
    sites = {site.name: site for site in moe_sites(moe)}
    batch, length, dim = h.shape
    logits = hooks.linear(ROUTER, h, layer)  # [B, T, E]
    routing = route(logits.reshape(batch * length, -1), moe.top_k, moe.norm_topk, h.dtype)
    act = lambda x: activation(x, config)  # noqa: E731
    flat = h.reshape(batch * length, dim)
    if config.moe_impl == "dense":
        dense = jnp.sum(jax.nn.one_hot(routing.experts, moe.num_experts, dtype=h.dtype)
                        * routing.weights[..., None], axis=1)  # [N, E]
        x = jnp.broadcast_to(flat[:, None, None, :], (flat.shape[0], 1, moe.num_experts, dim))
        gate_up = hooks.linear(EXPERTS_GATE_UP, x, layer)  # [N, 1, E, 2, F]
        out = hooks.linear(EXPERTS_DOWN, swiglu(gate_up, act), layer)  # [N, 1, E, D]
        y = jnp.einsum("NED,NE->ND", out[:, 0], dense)
    else:
        plan = dispatch(routing.experts, moe.num_experts)
        rows = constrain(flat[plan.token], (("batch", "seq"), "embed"))
        gate_up = hooks.linear(EXPERTS_GATE_UP, rows, layer, groups=plan.group_sizes)
        hidden = constrain(swiglu(gate_up, act), (("batch", "seq"), "expert_mlp"))
        out = hooks.linear(EXPERTS_DOWN, hidden, layer, groups=plan.group_sizes)
        y = combine(out, plan, routing.weights)
    y = y.reshape(batch, length, dim)
    if moe.shared_expert:
        gate = hooks.linear(sites["gate_proj"], h, layer)
        up = hooks.linear(sites["up_proj"], h, layer)
        shared = hooks.linear(sites["down_proj"], act(gate) * up, layer)
        if moe.shared_gate:
            shared = jax.nn.sigmoid(hooks.linear(SHARED_GATE, h, layer)) * shared
        y = y + shared
    return y, {"router": router_stats(routing, valid, moe.num_experts)}
