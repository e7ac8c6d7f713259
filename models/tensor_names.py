"""Where each jft parameter lives in HF safetensors and in GGUF, and how to lay it out.

Both formats store linear weights as [out, in] (GGUF lists dims innermost first, so
gguf's numpy arrays already read [out, in]); jft keeps [in, ...out] with heads split.
The top-level tensors (embed, lm_head, final_norm) keep the checkpoint's layout, so
they stream into place a chunk of rows at a time.

A `Layout` also maps a part of a jft leaf back onto the part of the checkpoint tensor
that holds it, so that a sharded load reads only the rows its devices hold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np

from jft.models.config import ModelConfig
from jft.models.sites import HF_LAYER, LinearSite, linear_sites

Ranges = tuple[tuple[int, int], ...]  # [start, stop) per axis


@dataclass(frozen=True)
class Layout:
    """A jft leaf is its checkpoint tensor with axes split and reordered.

    `checkpoint` names the checkpoint tensor's axes, outermost first; an axis holding
    heads is the pair (heads, "head_dim"), value h of head n at n * head_dim + h. `jft`
    orders the same names as jft's leaf (per layer: without the stacked L axis).
    """

    checkpoint: tuple[tuple[str, ...], ...]
    jft: tuple[str, ...]

    def checkpoint_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The checkpoint tensor's shape for a jft leaf of `shape`."""
        size = dict(zip(self.jft, shape, strict=True))
        return tuple(math.prod(size[name] for name in group) for group in self.checkpoint)

    def checkpoint_ranges(self, index: Ranges, config: ModelConfig) -> Ranges:
        """The checkpoint ranges that jft[index] lies in. An axis holding heads is taken
        in whole heads: a head_dim range is not contiguous there, and llama.cpp's rotary
        permutation is undone head by head."""
        where = dict(zip(self.jft, index, strict=True))
        scales = [config.head_dim if len(group) == 2 else 1 for group in self.checkpoint]
        return tuple(
            (where[group[0]][0] * scale, where[group[0]][1] * scale)
            for group, scale in zip(self.checkpoint, scales, strict=True)
        )

    def to_jft(self, block: np.ndarray, config: ModelConfig,
               index: Ranges | None = None) -> np.ndarray:
        """The whole checkpoint tensor in jft's layout or, given `index`, the block at
        `checkpoint_ranges(index)` laid out as jft[index]."""
        where = dict(zip(self.jft, index, strict=True)) if index is not None else {}
        names, view, cuts = [], [], []
        for group, size in zip(self.checkpoint, block.shape, strict=True):
            names += group
            if len(group) == 2:
                view += [size // config.head_dim, config.head_dim]
                cuts += [slice(None), slice(*where.get(group[1], (None, None)))]
            else:
                view.append(size)
                cuts.append(slice(None))
        laid = block.reshape(view)[tuple(cuts)]
        return laid.transpose([names.index(name) for name in self.jft])

    def from_jft(self, value: np.ndarray) -> np.ndarray:
        """A whole jft leaf (one layer) back in the checkpoint's layout."""
        names = [name for group in self.checkpoint for name in group]
        laid = value.transpose([self.jft.index(name) for name in names])
        return laid.reshape(self.checkpoint_shape(value.shape))


@dataclass(frozen=True)
class TensorSource:
    """One jft leaf: its names in each format ({i} is the layer) and its layout."""

    hf: str
    gguf: str
    layout: Layout

    def to_jft(self, weights: np.ndarray, config: ModelConfig) -> np.ndarray:
        return self.layout.to_jft(weights, config)

    def from_jft(self, value: np.ndarray, config: ModelConfig) -> np.ndarray:
        return self.layout.from_jft(value)


def _same(*axes: str) -> Layout:
    return Layout(tuple((axis,) for axis in axes), axes)


def _linear_layout(site: LinearSite) -> Layout:
    """A linear's weight: [out, in] in the checkpoint (heads with head_dim folded into
    one axis) -> the site's layout, e.g. [N * H, D] -> [D, N, H] for q_proj."""
    return Layout((site.out_axes, site.in_axes), site.weight_axes[1:])


def _bias_layout(site: LinearSite) -> Layout:
    """[out] -> [*out], e.g. [N * H] -> [N, H]."""
    return Layout((site.out_axes,), site.out_axes)


@dataclass(frozen=True)
class ExpertStackSource:
    """A layer's stack of expert matrices (`LinearSite.experts`), stored either fused, as
    transformers 5 keeps it in memory (`mlp.experts.gate_up_proj` [E, 2F, D]: per expert
    [out, in], gate rows before up rows), or one tensor per expert and projection, as
    save_pretrained writes it (`mlp.experts.{e}.gate_proj.weight` [F, D], `up_proj`, ...).
    `parts` are those per-expert names ({i} the layer, {e} the expert), in output order."""

    site: LinearSite
    fused: str
    parts: tuple[str, ...]

    @property
    def hf(self) -> str:
        return self.fused

    @property
    def gguf(self) -> str:
        return self.fused

    def read_layer(self, has, read, config: ModelConfig, i: int) -> np.ndarray:
        """Layer i's stack in jft's layout [E, *in, *out], from whichever form is stored;
        `read(name)` gives a whole tensor, `has(name)` says whether it is stored."""
        dims_in, dims_out = self.site.dims(config)
        size_in = math.prod(dims_in)
        experts = config.num_experts
        fused = self.fused.format(i=i)
        if has(fused):
            stack = read(fused, (experts, math.prod(dims_out), size_in))
        else:
            part_shape = (math.prod(dims_out) // len(self.parts), size_in)
            stack = np.stack([np.concatenate([read(part.format(i=i, e=e), part_shape)
                                              for part in self.parts])
                              for e in range(experts)])
        stack = stack.reshape(experts, *dims_out, *dims_in)
        out_axes = range(1, 1 + len(dims_out))
        return stack.transpose(0, *range(1 + len(dims_out), stack.ndim), *out_axes)

    def checkpoint_tensors(self, stacked, config: ModelConfig, i: int):
        """(name, shape, thunk reading it) per expert and part of layer i of the stacked
        leaf [L, E, *in, *out], as save_pretrained writes them; one expert is read off the
        device at a time."""
        dims_in, dims_out = self.site.dims(config)
        size_in, size_out = math.prod(dims_in), math.prod(dims_out)
        rows = size_out // len(self.parts)

        def read(e, p):
            matrix = np.asarray(stacked[i, e]).reshape(size_in, size_out).T
            return matrix[p * rows:(p + 1) * rows]

        for e in range(config.num_experts):
            for p, part in enumerate(self.parts):
                yield part.format(i=i, e=e), (rows, size_in), partial(read, e, p)


def expert_sources(config: ModelConfig) -> dict[str, ExpertStackSource]:
    """The expert stacks of an MoE family, in its checkpoint's naming."""
    from jft.models import mixtral

    module, (gate, up, down) = (mixtral.CHECKPOINT_EXPERTS if config.family == "mixtral"
                                else ("mlp", ("gate_proj", "up_proj", "down_proj")))
    per_expert = HF_LAYER + module + ".experts.{e}.%s.weight"
    sites = {site.name: site for site in linear_sites(config) if site.experts}
    return {
        "experts_gate_up": ExpertStackSource(sites["experts_gate_up"],
                                             HF_LAYER + "mlp.experts.gate_up_proj",
                                             (per_expert % gate, per_expert % up)),
        "experts_down": ExpertStackSource(sites["experts_down"],
                                          HF_LAYER + "mlp.experts.down_proj",
                                          (per_expert % down,)),
    }


_BLK = "blk.{i}."

TOP_LEVEL: dict[str, TensorSource] = {
    "embed": TensorSource("model.embed_tokens.weight", "token_embd.weight",
                          _same("vocab", "embed")),
    "final_norm": TensorSource("model.norm.weight", "output_norm.weight", _same("embed")),
    "lm_head": TensorSource("lm_head.weight", "output.weight", _same("vocab", "embed")),
}


def layer_sources(config: ModelConfig) -> dict[str, TensorSource]:
    """The per-layer tensors of this config's family."""

    def src(hf, gguf, layout):
        return TensorSource(HF_LAYER + hf, _BLK + gguf, layout)

    embed = _same("embed")
    sites = [site for site in linear_sites(config) if not site.experts]
    # A parameter site's path already names its tensor (a router's `mlp.gate.weight`).
    linears = {site.name: src(site.hf_path if site.parameter else f"{site.hf_path}.weight",
                              f"{site.gguf}.weight", _linear_layout(site)) for site in sites}
    if config.family == "mixtral":  # its checkpoints' name for the MoE module
        from jft.models import mixtral

        linears["router"] = dataclasses.replace(linears["router"], hf=linears["router"].hf.replace(
            ".mlp.", f".{mixtral.CHECKPOINT_EXPERTS[0]}."))
    biases = {site.bias: src(f"{site.hf_path}.bias", f"{site.gguf}.bias", _bias_layout(site))
              for site in sites if site.bias is not None}
    norms = (Layout((("heads", "head_dim"),), ("heads", "head_dim")),
             Layout((("kv_heads", "head_dim"),), ("kv_heads", "head_dim"))
             ) if config.qk_norm_whole else (_same("head_dim"),) * 2
    sources = {
        "attn_norm": src("input_layernorm.weight", "attn_norm.weight", embed),
        **linears,
        **biases,
        "q_norm": src("self_attn.q_norm.weight", "attn_q_norm.weight", norms[0]),
        "k_norm": src("self_attn.k_norm.weight", "attn_k_norm.weight", norms[1]),
    }
    if config.post_norms:
        # Gemma 2/3 reuse HF's `post_attention_layernorm` name for the norm *after*
        # attention; their pre-MLP norm is `pre_feedforward_layernorm`.
        sources["post_attn_norm"] = src("post_attention_layernorm.weight",
                                        "post_attention_norm.weight", embed)
        sources["mlp_norm"] = src("pre_feedforward_layernorm.weight", "ffn_norm.weight", embed)
        sources["post_mlp_norm"] = src("post_feedforward_layernorm.weight",
                                       "post_ffw_norm.weight", embed)
    else:
        sources["mlp_norm"] = src("post_attention_layernorm.weight", "ffn_norm.weight", embed)
    return sources


def checkpoint_tensors(params: dict, config: ModelConfig, name_of: Callable[[TensorSource], str]
                       ) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(name, shape in the checkpoint layout, a thunk reading it off the device in that
    layout) of every tensor of a jft params tree, in the checkpoints' order: embeddings,
    layer by layer, final norm, head. `name_of` picks the format (`lambda s: s.hf`)."""

    def top(key: str):
        leaf = params[key]
        return name_of(TOP_LEVEL[key]), tuple(leaf.shape), lambda: np.asarray(leaf)

    yield top("embed")
    sources = layer_sources(config)
    experts = expert_sources(config) if config.moe is not None else {}
    for i in range(config.num_layers):
        for key, stacked in params["layers"].items():
            if key in experts:
                yield from experts[key].checkpoint_tensors(stacked, config, i)
                continue
            source = sources[key]
            yield (name_of(source).format(i=i),
                   source.layout.checkpoint_shape(tuple(stacked.shape[1:])),
                   lambda source=source, stacked=stacked, i=i: source.from_jft(
                       np.asarray(stacked[i]), config))
    yield top("final_norm")
    if "lm_head" in params:
        yield top("lm_head")
