"""Norm tuning: train the RMSNorm scales, as PEFT's LN_TUNING does (Zhao et al. 2023).

PEFT trains a copy of each targeted norm's weight; here the delta is an additive offset
on the weight (zeros at init), which is the same parametrisation shifted by a constant:
same trainable count, same gradients. It is applied in `edit_params`, before the
forward, so it costs one add per norm.

Norms are named as jft's params (`attn_norm`, `mlp_norm`, `post_attn_norm`,
`post_mlp_norm`, `q_norm`, `k_norm`, `final_norm`) or as HF modules (`input_layernorm`,
`post_attention_layernorm`, `pre_feedforward_layernorm`, `post_feedforward_layernorm`,
`q_norm`, `k_norm`, `norm`), mapped per family as the checkpoint loader maps them (on
Gemma 2/3 `post_attention_layernorm` is the norm after attention). The default is
PEFT's for Llama: input_layernorm, post_attention_layernorm and the final norm.

The delta: `layers[norm]` [L, size] and `final_norm` [D] when selected. Layers outside
`layers` (PEFT's layers_to_transform) are masked to a zero offset.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.models import ModelConfig, param_axes, param_shapes
from jft.models.tensor_names import layer_sources
from jft.peft.base import MethodBase, layer_mask, register


@dataclasses.dataclass(frozen=True)
class NormTuningConfig:
    """norms: names (jft's or HF's, see the module doc) or "all"; layers: the layers whose
    per-layer norms are tuned, None for all (the final norm is not per layer)."""

    norms: str | tuple[str, ...] = ("attn_norm", "mlp_norm", "final_norm")
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.norms, str) and self.norms != "all":
            object.__setattr__(self, "norms", (self.norms,))
        elif isinstance(self.norms, list):
            object.__setattr__(self, "norms", tuple(self.norms))
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))


def norm_names(model: ModelConfig) -> dict[str, str]:
    """Every accepted name of this model's norms (jft's and HF's) -> jft's leaf name."""
    layer_norms = [k for k in param_shapes(model)["layers"] if k.endswith("norm")]
    sources = layer_sources(model)
    names = {"final_norm": "final_norm", "norm": "final_norm", "model.norm": "final_norm"}
    for name in layer_norms:
        names[name] = name
        hf = sources[name].hf.removeprefix("model.layers.{i}.").removesuffix(".weight")
        names[hf] = name  # e.g. "self_attn.q_norm"
        names[hf.rsplit(".", 1)[-1]] = name  # e.g. "q_norm", "input_layernorm"
    return names


@cache
def plan(model: ModelConfig, config: NormTuningConfig) -> tuple[dict[str, np.ndarray], bool]:
    """(per-layer norm -> bool [L] of tuned layers, whether the final norm is tuned)."""
    names = norm_names(model)
    if config.norms == "all":
        chosen = sorted(set(names.values()))
    else:
        unknown = [n for n in config.norms if n not in names]
        if unknown:
            jft_names = sorted(set(names.values()))
            hf_names = sorted(n for n in names if n not in jft_names and "." not in n)
            raise JftError(
                f"norm_tuning norm {unknown[0]!r} is not in this {model.family} model; "
                f"valid: {', '.join(jft_names)} (or HF's {', '.join(hf_names)}), or 'all'"
            )
        chosen = sorted({names[n] for n in config.norms})
    active = np.ones(model.num_layers, bool)
    if config.layers is not None:
        bad = [i for i in config.layers if not 0 <= i < model.num_layers]
        if bad:
            raise JftError(f"norm_tuning layers has {bad}; the model has layers "
                           f"0..{model.num_layers - 1}")
        active = np.zeros(model.num_layers, bool)
        active[list(config.layers)] = True
    layer_norms = {n: active for n in chosen if n != "final_norm"}
    return layer_norms, "final_norm" in chosen


class NormTuning(MethodBase):
    name = "norm_tuning"
    Config = NormTuningConfig

    def init(self, key, base, model, config, calibration_batches=None):
        layer_norms, final = plan(model, config)
        delta = {"layers": {n: jnp.zeros(base["layers"][n].shape, jnp.float32)
                            for n in layer_norms}}
        if final:
            delta["final_norm"] = jnp.zeros(base["final_norm"].shape, jnp.float32)
        return delta

    def edit_params(self, params, delta, model, config):
        # Kept in fp32: rms_norm computes in fp32 anyway.
        return _fold(params, delta, model, config, sign=1.0, cast=False)

    def merge(self, base, delta, model, config):
        return _fold(base, delta, model, config, sign=1.0, cast=True)

    def unmerge(self, base, delta, model, config):
        return _fold(base, delta, model, config, sign=-1.0, cast=True)

    def num_params(self, delta, model, config):
        layer_norms, final = plan(model, config)
        shapes = param_shapes(model)
        total = sum(shapes["layers"][n][1] * int(active.sum()) for n, active in layer_norms.items())
        return total + (model.embed_dim if final else 0)

    def identity(self, delta, base, model, config):
        return {k: (jnp.zeros_like(v) if k != "layers" else
                    {n: jnp.zeros_like(x) for n, x in v.items()}) for k, v in delta.items()}

    def delta_axes(self, delta, model, config):
        return param_axes(delta)  # offsets shaped and named like the norms they shift


def _fold(params, delta, model, config, sign, cast):
    layer_norms, final = plan(model, config)

    def add(weight, offset):
        value = weight.astype(jnp.float32) + sign * offset.astype(jnp.float32)
        return value.astype(weight.dtype) if cast else value

    layers = dict(params["layers"])
    for name, active in layer_norms.items():
        offset = delta["layers"][name]
        layers[name] = add(layers[name], layer_mask(active, offset.shape) * offset)
    out = dict(params, layers=layers)
    if final:
        out["final_norm"] = add(params["final_norm"], delta["final_norm"])
    return out


NORM_TUNING = register(NormTuning())
