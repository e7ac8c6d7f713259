"""The linear call sites of a decoder layer, declared once.

A `LinearSite` is one matmul of a layer, y = einsum(equation, x, W) (+ b). Its equation
names every dimension by a letter (gemma's style): B batch, T tokens, D embed, N query
heads, K kv heads, H head dim, F mlp. The weight's letters split into the *input* ones
(contracted with x) and the *output* ones (kept in y); `in_axes` and `out_axes` give their
logical axis names (`PARAM_AXES`, and the sharding rules), in the order the letters
appear in x and in y. Everything a PEFT method needs is derived from that: the sizes
(`dims`), LoRA's two einsums (`low_rank_equations`), the weight's logical axes, its HF
module path. No method keeps a table of modules, so a new site (an MoE expert matmul
`BTD,EDF->BTEF`, a vision projector) needs its declaration here and a call in the model,
and no edit in any method.

Methods that treat a weight as a matrix read it in the in-out layout [*in, *out]
(`to_in_out` / `from_in_out`); every site below is stored that way already, so for them
those are no-ops.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jft.models.config import ModelConfig
from jft.models.grouped import grouped_matmul

# The HF module path of decoder layer {i}; a site's path continues it.
HF_LAYER = "model.layers.{i}."
# A logical axis -> the ModelConfig field that sizes it.
AXIS_SIZES = {"vocab": "vocab_size", "embed": "embed_dim", "heads": "num_heads",
              "kv_heads": "num_kv_heads", "head_dim": "head_dim", "mlp": "mlp_dim",
              "layers": "num_layers", "experts": "num_experts",
              "expert_mlp": "expert_mlp_dim", "unit": "unit_dim", "gate_up": "gate_up_dim"}
RANK = "r"  # the letter of LoRA's rank in the derived einsums
EXPERT = "E"  # the letter of a stack of routed experts' own axis


def axis_size(config: ModelConfig, axis: str) -> int:
    """The size of a logical axis in a model of this config."""
    return getattr(config, AXIS_SIZES[axis])


@dataclasses.dataclass(frozen=True)
class LinearSite:
    """One linear of a decoder layer.

    name: its name in targets and deltas, and its weight's key in `params["layers"]`.
    equation: the einsum, x's letters first (e.g. "BTD,DNH->BTNH").
    in_axes / out_axes: logical axes of the weight's input and output letters, in x's and
        y's order (q_proj: ("embed",) and ("heads", "head_dim")).
    hf_path: the HF module under the layer ("self_attn.q_proj"); gguf: the GGUF tensor
        name under the block ("attn_q").
    bias: the key of its bias leaf, `bias_when` the ModelConfig flag under which the
        model's own params have it (merges may create it where they do not).
    input: the activation it reads; linears declaring the same one read the same tensor
        (q, k and v the attention norm's output). None: its own.
    experts: a stack of routed experts' linears, one matrix per expert: the weight's first
        letter is `EXPERT`, which also follows the lead in x and y (the dense form
        "BTED,EDF->BTEF", every token through every expert). Run grouped, x is instead
        the rows routed to experts [M, *in], sorted by expert, with the group sizes [E].
        A method's factors then carry the expert axis too (per-expert LoRA).
    parameter: PEFT reaches it as a parameter (`target_parameters`), not as a module:
        fused expert stacks and routers that are not `nn.Linear`; `hf_path` names the
        parameter ("mlp.experts.gate_up_proj").
    """

    name: str
    equation: str
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    hf_path: str
    gguf: str
    bias: str | None = None
    bias_when: str | None = None
    input: str | None = None
    experts: bool = False
    parameter: bool = False

    def __post_init__(self):
        x, w, y = self._specs()
        lead = self.lead
        if not (x.startswith(lead) and y.startswith(lead) and lead):
            raise ValueError(f"{self.name}: x and y of {self.equation!r} must share their "
                             "leading (batch, token) letters")
        if self.experts and not (w[0] == EXPERT and x[len(lead)] == EXPERT == y[len(lead)]):
            raise ValueError(f"{self.name}: an expert stack's weight starts with {EXPERT!r}, "
                             "which follows the lead in x and y")
        if sorted(w) != sorted(self.group_letters + self.in_letters + self.out_letters):
            raise ValueError(f"{self.name}: the weight of {self.equation!r} must hold exactly "
                             "the input letters it contracts and the output letters it adds")
        if len(self.in_axes) != len(self.in_letters) or len(self.out_axes) != len(
                self.out_letters):
            raise ValueError(f"{self.name}: in_axes/out_axes must name each of the letters "
                             f"{self.in_letters!r} / {self.out_letters!r}")
        if RANK in self.equation:
            raise ValueError(f"{self.name}: {RANK!r} is reserved for LoRA's rank")

    # ---------------------------------------------------------------- letters

    def _specs(self) -> tuple[str, str, str]:
        inputs, y = self.equation.split("->")
        x, w = inputs.split(",")
        return x, w, y

    @property
    def lead(self) -> str:
        """The letters of x that are not the weight's: "BT"."""
        x, w, _ = self._specs()
        return "".join(c for c in x if c not in w)

    @property
    def group_letters(self) -> str:
        """The expert letter of an expert stack, else ""."""
        return EXPERT if self.experts else ""

    @property
    def in_letters(self) -> str:
        return self._specs()[0][len(self.lead) + len(self.group_letters):]

    @property
    def out_letters(self) -> str:
        return self._specs()[2][len(self.lead) + len(self.group_letters):]

    @property
    def weight_letters(self) -> str:
        return self._specs()[1]

    # ---------------------------------------------------------------- derived facts

    @property
    def weight_axes(self) -> tuple[str, ...]:
        """The stacked weight's logical axes: ("layers", *one per weight letter)."""
        names = dict(zip(self.in_letters + self.out_letters, self.in_axes + self.out_axes,
                         strict=True), **({EXPERT: "experts"} if self.experts else {}))
        return ("layers", *(names[c] for c in self.weight_letters))

    @property
    def group_axes(self) -> tuple[str, ...]:
        """The logical axes a method's per-expert factors carry before their own."""
        return ("experts",) if self.experts else ()

    @property
    def bias_axes(self) -> tuple[str, ...]:
        """The stacked bias's logical axes, and those of any per-output-feature vector."""
        return ("layers", *self.out_axes)

    def dims(self, config: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(input dims, output dims) in a model of this config: x is [B, T, *in], y
        [B, T, *out]."""
        return (tuple(axis_size(config, a) for a in self.in_axes),
                tuple(axis_size(config, a) for a in self.out_axes))

    def sizes(self, config: ModelConfig) -> tuple[int, int]:
        """(input features, output features): the weight as a matrix."""
        dims_in, dims_out = self.dims(config)
        return math.prod(dims_in), math.prod(dims_out)

    def group_shape(self, config: ModelConfig) -> tuple[int, ...]:
        """(num_experts,) for an expert stack, else ()."""
        return tuple(axis_size(config, a) for a in self.group_axes)

    def weight_shape(self, config: ModelConfig) -> tuple[int, ...]:
        """One layer's weight shape, in its stored layout."""
        return tuple(axis_size(config, a) for a in self.weight_axes[1:])

    def low_rank_equations(self) -> tuple[str, str]:
        """LoRA's einsums through rank r: 'BTNH,NHD->BTD' gives 'BTNH,NHr->BTr' (x A, A
        [*in, r]) and 'BTr,rD->BTD' ((x A) B, B [r, *out])."""
        x, _, y = self._specs()
        lead, group = self.lead, self.group_letters
        return (f"{x},{group}{self.in_letters}{RANK}->{lead}{group}{RANK}",
                f"{lead}{group}{RANK},{group}{RANK}{self.out_letters}->{y}")

    # ------------------------------------------------- applying it (dense or grouped)

    def project(self, x, weight, groups=None):
        """x through the weight [*group, *in, *out] (stored layout): the site's einsum,
        or for an expert stack run grouped (`groups`: the group sizes [E]) a grouped
        matmul of the routed rows x [M, *in] -> [M, *out]."""
        if groups is None:
            return jnp.einsum(self.equation, x, weight.astype(x.dtype))
        return _grouped(x, self.to_in_out(weight), len(self.in_letters), groups)

    def shrink(self, x, a, groups=None):
        """x A: [lead, *group, *in] x [*group, *in, r] -> [lead, *group, r]."""
        if groups is None:
            return jnp.einsum(self.low_rank_equations()[0], x, a)
        return _grouped(x, a, len(self.in_letters), groups)

    def expand(self, xa, b, groups=None):
        """(x A) B: [lead, *group, r] x [*group, r, *out] -> [lead, *group, *out]."""
        if groups is None:
            return jnp.einsum(self.low_rank_equations()[1], xa, b)
        return _grouped(xa, b, 1, groups)

    def path(self, layer: int) -> str:
        """The HF module path in layer `layer`, e.g. `model.layers.3.self_attn.q_proj`."""
        return HF_LAYER.format(i=layer) + self.hf_path

    def has_bias(self, config: ModelConfig) -> bool:
        """Whether the model's own (unmerged) params have this linear's bias."""
        return self.bias is not None and bool(self.bias_when and getattr(config,
                                                                          self.bias_when))

    # ---------------------------------------------------------------- layouts

    def to_in_out(self, weight, lead: int = 0):
        """A weight [*lead, stored layout] as [*lead, *group, *in, *out] (a transpose, or
        itself)."""
        return _transpose(weight, self.weight_letters,
                          self.group_letters + self.in_letters + self.out_letters, lead)

    def from_in_out(self, weight, lead: int = 0):
        """Inverse of `to_in_out`."""
        return _transpose(weight, self.group_letters + self.in_letters + self.out_letters,
                          self.weight_letters, lead)


def _grouped(x, weight, in_count: int, groups):
    """Rows x [M, *in] through per-group weights [G, *in, *out] -> [M, *out]."""
    return grouped_matmul(x, weight, groups, in_count)


def _transpose(array, source: str, target: str, lead: int):
    if source == target:
        return array
    order = [lead + source.index(c) for c in target]
    return array.transpose((*range(lead), *order))


TRANSFORMER_SITES: tuple[LinearSite, ...] = (
    LinearSite("q_proj", "BTD,DNH->BTNH", ("embed",), ("heads", "head_dim"), "self_attn.q_proj",
               "attn_q", "q_bias", "qkv_bias", input="attention_input"),
    LinearSite("k_proj", "BTD,DKH->BTKH", ("embed",), ("kv_heads", "head_dim"),
               "self_attn.k_proj", "attn_k", "k_bias", "qkv_bias", input="attention_input"),
    LinearSite("v_proj", "BTD,DKH->BTKH", ("embed",), ("kv_heads", "head_dim"),
               "self_attn.v_proj", "attn_v", "v_bias", "qkv_bias", input="attention_input"),
    LinearSite("o_proj", "BTNH,NHD->BTD", ("heads", "head_dim"), ("embed",), "self_attn.o_proj",
               "attn_output", "o_bias", "o_bias"),
    LinearSite("gate_proj", "BTD,DF->BTF", ("embed",), ("mlp",), "mlp.gate_proj", "ffn_gate",
               "gate_bias", "mlp_bias", input="mlp_input"),
    LinearSite("up_proj", "BTD,DF->BTF", ("embed",), ("mlp",), "mlp.up_proj", "ffn_up",
               "up_bias", "mlp_bias", input="mlp_input"),
    LinearSite("down_proj", "BTF,FD->BTD", ("mlp",), ("embed",), "mlp.down_proj", "ffn_down",
               "down_bias", "mlp_bias"),
)


# Families whose layers call other linears than the transformer's seven (a vision family
# would declare its sites here, and its forward would call them). MoE models' sites
# follow from their `MoeConfig` (`jft.models.moe.moe_sites`).
FAMILY_SITES: dict[str, tuple[LinearSite, ...]] = {}


def linear_sites(config: ModelConfig) -> tuple[LinearSite, ...]:
    """The linears a layer of this model calls, in call order."""
    if config.moe is not None:
        from jft.models.moe import moe_sites

        return moe_sites(config.moe)
    return FAMILY_SITES.get(config.family, TRANSFORMER_SITES)


def declared_sites() -> tuple[LinearSite, ...]:
    """Every site any family declares (the transformer's first), for checking names
    before there is a model."""
    from jft.models.moe import SHARED_EXPERT_SITES

    out = {site.name: site for site in TRANSFORMER_SITES}
    for sites in (*FAMILY_SITES.values(), SHARED_EXPERT_SITES):
        out |= {site.name: site for site in sites if site.name not in out}
    return tuple(out.values())


def site_names(config: ModelConfig) -> tuple[str, ...]:
    return tuple(site.name for site in linear_sites(config))


def linear_site(config: ModelConfig, name: str) -> LinearSite:
    """The site called `name` in this model (KeyError naming the valid ones if none)."""
    for site in linear_sites(config):
        if site.name == name:
            return site
    raise KeyError(f"no linear {name!r}; valid: {', '.join(site_names(config))}")


def site_index(config: ModelConfig, site: LinearSite) -> int:
    """The site's position in the model's declaration (e.g. to fold into a dropout key)."""
    return site_names(config).index(site.name)


def input_group(config: ModelConfig, name: str) -> str:
    """The first declared site that reads the same input as `name` (itself if none)."""
    wanted = linear_site(config, name).input
    if wanted is None:
        return name
    return next(s.name for s in linear_sites(config) if s.input == wanted)
