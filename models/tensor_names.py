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


_BLK = "blk.{i}."  # a GGUF layer's tensors


@dataclass(frozen=True)
class ExpertTensors:
    """How one format stores a layer's expert stack ({i} the layer, {e} the expert). Each
    expert's matrix is [out, in], the projections concatenated along out in `out` order,
    and a checkpoint holds one of three forms:
    - `fused`: one tensor [E, out, in] (transformers 5 in memory: `mlp.experts.gate_up_proj`
      [E, 2F, D], gate rows before up rows; llama.cpp: `ffn_down_exps`, and the
      `ffn_gate_up_exps` of its `--fuse-gate-up-exps`);
    - `stacked`: one tensor per projection holding every expert, [E, out / n, in]
      (llama.cpp's `ffn_gate_exps` and `ffn_up_exps`);
    - `per_expert`: one tensor per expert and projection, [out / n, in], as save_pretrained
      writes them (`mlp.experts.{e}.gate_proj.weight`, `up_proj`, ...)."""

    fused: str
    stacked: tuple[str, ...] = ()
    per_expert: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExpertStackSource:
    """A layer's stack of expert matrices (`LinearSite.experts`): where HF checkpoints and
    GGUF files keep it (`hf`, `gguf`: a `_Reader`'s `name_of` picks one)."""

    site: LinearSite
    hf: ExpertTensors
    gguf: ExpertTensors

    def read_layer(self, names: ExpertTensors, has, read, config: ModelConfig,
                   i: int) -> np.ndarray:
        """Layer i's stack in jft's layout [E, *in, *out], from whichever of `names`' forms
        is stored (the fused one where it is); `read(name, shape)` gives a whole tensor,
        checked to have `shape`, and `has(name)` says whether it is stored."""
        dims_in, dims_out = self.site.dims(config)
        size_in, size_out = math.prod(dims_in), math.prod(dims_out)
        experts = config.num_experts
        fused = names.fused.format(i=i)
        if has(fused) or not (names.stacked or names.per_expert):
            stack = read(fused, (experts, size_out, size_in))
        elif names.stacked:
            rows = size_out // len(names.stacked)
            stack = np.concatenate([read(name.format(i=i), (experts, rows, size_in))
                                    for name in names.stacked], axis=1)
        else:
            rows = size_out // len(names.per_expert)
            stack = np.stack([np.concatenate([read(part.format(i=i, e=e), (rows, size_in))
                                              for part in names.per_expert])
                              for e in range(experts)])
        stack = stack.reshape(experts, *dims_out, *dims_in)
        out_axes = range(1, 1 + len(dims_out))
        return stack.transpose(0, *range(1 + len(dims_out), stack.ndim), *out_axes)

    def checkpoint_tensors(self, stacked, config: ModelConfig, i: int):
        """(name, shape, thunk reading it) per expert and part of layer i of the stacked
        leaf [L, E, *in, *out], as save_pretrained writes them; one expert is read off the
        device at a time."""
        parts = self.hf.per_expert
        dims_in, dims_out = self.site.dims(config)
        size_in, size_out = math.prod(dims_in), math.prod(dims_out)
        rows = size_out // len(parts)

        def read(e, p):
            matrix = np.asarray(stacked[i, e]).reshape(size_in, size_out).T
            return matrix[p * rows:(p + 1) * rows]

        for e in range(config.num_experts):
            for p, part in enumerate(parts):
                yield part.format(i=i, e=e), (rows, size_in), partial(read, e, p)


def expert_sources(config: ModelConfig) -> dict[str, ExpertStackSource]:
    """The expert stacks of an MoE family, in its checkpoints' naming."""
    from jft.models import mixtral

    module, (gate, up, down) = (mixtral.CHECKPOINT_EXPERTS if config.family == "mixtral"
                                else ("mlp", ("gate_proj", "up_proj", "down_proj")))
    per_expert = HF_LAYER + module + ".experts.{e}.%s.weight"
    sites = {site.name: site for site in linear_sites(config) if site.experts}
    gate_up, down_site = sites["experts_gate_up"], sites["experts_down"]
    return {
        "experts_gate_up": ExpertStackSource(
            gate_up,
            ExpertTensors(HF_LAYER + "mlp.experts.gate_up_proj",
                          per_expert=(per_expert % gate, per_expert % up)),
            # llama.cpp's converter splits the gate and up stacks unless told to fuse them.
            ExpertTensors(f"{_BLK}{gate_up.gguf}.weight",
                          stacked=(f"{_BLK}ffn_gate_exps.weight", f"{_BLK}ffn_up_exps.weight"))),
        "experts_down": ExpertStackSource(
            down_site,
            ExpertTensors(HF_LAYER + "mlp.experts.down_proj", per_expert=(per_expert % down,)),
            ExpertTensors(f"{_BLK}{down_site.gguf}.weight")),
    }


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
