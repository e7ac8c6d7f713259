"""Building adapters from plain options, as configs and the CLI give them."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from jft.errors import ConfigValueError, JftError
from jft.models import ModelConfig
from jft.models.sites import linear_site
from jft.peft.base import Adapter, Targets, get_method
from jft.quant.params import dequantize_params, is_quantized_tree


def make_config(method: str, options: Mapping[str, Any]):
    """The method's config from a dict; unknown options name the valid ones.

    For methods with targets, `targets` takes module names, "all-linear" or a regex,
    and `layers_to_transform` a list of layer indices.
    """
    impl = get_method(method)
    fields = {f.name: f for f in dataclasses.fields(impl.Config)}
    options = dict(options)
    layers = options.pop("layers_to_transform", None)
    parameters = options.pop("target_parameters", None)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = sorted(fields) + (["layers_to_transform", "target_parameters"]
                                  if "targets" in fields else [])
        raise JftError(
            f"unknown option {unknown[0]!r} for method {method!r}; valid: {', '.join(valid)}"
        )
    if "targets" in fields and ("targets" in options or layers is not None or parameters):
        # As in PEFT, target_parameters alone targets no module.
        default = () if parameters and "targets" not in options else fields[
            "targets"].default.modules
        modules = options.get("targets", default)
        modules = modules if isinstance(modules, str) else tuple(modules)
        options["targets"] = Targets(modules, None if layers is None else tuple(layers),
                                     tuple(parameters or ()))
    elif layers is not None or parameters:
        name = "layers_to_transform" if layers is not None else "target_parameters"
        raise JftError(f"method {method!r} has no targets, so no {name}")
    try:
        return impl.Config(**options)
    except TypeError as error:
        raise JftError(f"bad options for method {method!r}: {error}") from None


def config_to_options(config) -> dict[str, Any]:
    """A method config as the plain options `make_config` takes back: every option,
    defaults included, as JSON/YAML values (for run files and adapter formats)."""
    hints = typing.get_type_hints(type(config))
    options = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, Targets):
            options["targets"] = value.modules if isinstance(value.modules, str) else list(
                value.modules)
            if value.layers is not None:
                options["layers_to_transform"] = list(value.layers)
            if value.parameters:
                options["target_parameters"] = list(value.parameters)
            continue
        args = typing.get_args(hints[field.name])
        if typing.get_origin(hints[field.name]) is tuple and args and typing.get_origin(
                args[0]) is tuple:
            value = dict(value)  # (key, value) pairs: PEFT's rank_pattern, init_options, ...
        options[field.name] = list(value) if isinstance(value, tuple) else value
    return options


def create(
    method: str,
    key: jax.Array,
    base: dict,
    model: ModelConfig,
    calibration_batches: Sequence[Any] | None = None,
    config: Any = None,
    **options,
) -> tuple[dict, Adapter]:
    """A fresh adapter, and the base it applies to (rewritten only by PiSSA-like inits).
    The method's settings: its typed `config` (e.g. a LoraConfig), or plain `options`."""
    impl = get_method(method)
    if config is None:
        config = make_config(method, options)
    elif options:
        raise JftError(f"give {method}'s config or its options, not both")
    _check_model_support(impl, config, model)
    quantized = is_quantized_tree(base)
    if quantized and impl.edits_base_weights:
        raise JftError(f"method {method!r} trains the base's own weights, which are quantized "
                       "here; quantize: none, or a method that trains beside them (lora, "
                       "dora, ia3, prompt_tuning, prefix_tuning, s2ft, ...)")
    # Inits that read weight values (DoRA's norms, PiSSA's SVD) read them dequantized.
    readable = dequantize_params(base, model) if quantized and impl.reads_base_weights(
        config) else base
    config, delta = impl.init_with_config(key, readable, model, config, calibration_batches)
    return impl.rebase(base, delta, model, config), Adapter(delta, method, config)


def _check_model_support(impl, config, model: ModelConfig) -> None:
    """Methods that cannot run on an MoE model, or on its expert stacks, say so."""
    if model.moe is not None and not impl.supports_moe:
        raise JftError(f"method {impl.name!r} does not support mixture-of-experts models "
                       f"({model.family}): its selection assumes a dense MLP; use lora (its "
                       "targets may include the experts), full, or a dense model")
    targets = getattr(config, "targets", None)
    if isinstance(targets, Targets) and not impl.targets_experts:
        experts = [s for s in targets.resolve(model) if linear_site(model, s).experts]
        if experts:
            raise ConfigValueError("method.targets",
                                   f"method {impl.name!r} cannot target the expert stack "
                                   f"{experts[0]!r}; lora can (per-expert factors)")
