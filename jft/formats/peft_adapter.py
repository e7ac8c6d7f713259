"""Hugging Face PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`),
written from jft adapters and read back into them.

Tensor keys are `base_model.model.<HF module path>.<name>`, PyTorch layouts ([out, in]),
float32. Per method (jft delta -> PEFT tensor, per targeted layer i):

- lora: a[i] [*in, r] -> `lora_A.weight` [r, in]; b[i] [r, *out] -> `lora_B.weight`
  [out, r]; DoRA's magnitude[i] [*out] -> `lora_magnitude_vector` [out]. Ranks padded in
  jft are cut to each layer's rank. An init that rewrote the base (init_a / init_b in the
  delta: PiSSA, CorDA, LoRA-GA) is written for the original base as PEFT's
  `subtract_mutated_init` does: A' = [A; A0], B' = [B, -B0], rank doubled, alpha scaled
  to keep alpha / r (alpha / sqrt(r) under rsLoRA).
- lora on a parameter site (an MoE router or expert stack, which PEFT reaches through
  `target_parameters`, not `target_modules`): PEFT's ParamWrapper keeps the tensors on the
  module holding the parameter (`mlp.gate`, `mlp.experts`). A stack of E experts (a[i]
  [E, *in, r], b[i] [E, r, *out]) gives `lora_A.weight` [E r, in], row e r + j for rank j
  of expert e, and `lora_B.weight` [out, r E], column j E + e (PEFT interleaves the two
  differently); a router is a plain matrix (E = 1). Two targeted parameters of one module
  nest, the first the module registers (gate_up_proj) innermost: its keys gain one
  `base_layer.` per wrapper around it. PEFT's layers_to_transform does not filter
  target_parameters, so parameters targeted in some layers only are named per layer.
- ia3: layers[module][i] -> `ia3_l`, [1, in] on feedforward modules, [out, 1] otherwise.
- prompt_tuning: embedding [P, D] -> `prompt_embeddings` (no prefix).
- prefix_tuning: the baked keys/values -> `prompt_embeddings` [P, L * 2 * K * H]; a
  reparameterised delta is written baked (`prefix_projection` false), as PEFT saves it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.formats.safetensors_io import SafetensorsFile
from jft.models import ModelConfig
from jft.models.sites import HF_LAYER, linear_site, linear_sites
from jft.peft import Adapter, Targets, prefix_tuning, prompt_tuning
from jft.peft import ia3 as ia3_method
from jft.peft import lora as lora_method
from jft.storage import save_safetensors

PEFT_METHODS = ("lora", "ia3", "prompt_tuning", "prefix_tuning")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning",
               "PREFIX_TUNING": "prefix_tuning"}
_LAYER_KEY = re.compile(re.escape(_PREFIX + HF_LAYER).replace(r"\{i\}", r"(\d+)") + "(.+)")
# Config keys that change nothing jft computes (bookkeeping, init-time options, the prompt
# encoder's sizes, which the tensor shapes are checked against). Any other key must be
# off (None, False, empty or "none"), or the adapter is refused.
_COMMON_KEYS = {"peft_type", "task_type", "base_model_name_or_path", "revision",
                "inference_mode", "auto_mapping", "peft_version"}
_KNOWN_KEYS = {
    "lora": {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules",
             "layers_to_transform", "layers_pattern", "exclude_modules", "rank_pattern",
             "alpha_pattern", "fan_in_fan_out", "init_lora_weights", "loftq_config",
             "eva_config", "corda_config", "lora_ga_config", "megatron_core",
             "qalora_group_size", "ensure_weight_tying", "target_parameters"},
    "ia3": {"target_modules", "feedforward_modules", "exclude_modules", "fan_in_fan_out",
            "init_ia3_weights"},
    "prompt_tuning": {"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                      "num_attention_heads", "num_layers", "prompt_tuning_init",
                      "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"},
    "prefix_tuning": {"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                      "num_attention_heads", "num_layers", "encoder_hidden_size",
                      "prefix_projection", "init_weights"},
}
# init_lora_weights values that leave the base alone; the others (pissa, olora, corda,
# loftq, lora_ga) pair the adapter with a rewritten base that is not saved with it.
_PLAIN_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal")


def is_peft_adapter(path) -> bool:
    """A directory holding a PEFT adapter_config.json."""
    return (Path(path) / CONFIG_FILE).is_file()


# ---------------------------------------------------------------- writing


def save_peft_adapter(adapter: Adapter, model: ModelConfig, directory,
                      base_model_name: str | None = None) -> None:
    """Writes `adapter` as a PEFT adapter directory that `PeftModel.from_pretrained` loads
    over the original (unmodified) HF base."""
    if adapter.method not in PEFT_METHODS:
        raise JftError(f"{adapter.method} cannot be written as a PEFT adapter (PEFT has no "
                       "equivalent); export it with --format merged. PEFT adapters hold: "
                       f"{', '.join(PEFT_METHODS)}")
    delta = _to_numpy(adapter.delta)
    writer = {"lora": _lora_to_peft, "ia3": _ia3_to_peft, "prompt_tuning": _prompt_to_peft,
              "prefix_tuning": _prefix_to_peft}[adapter.method]
    config, tensors = writer(delta, adapter.config, model)
    config = {"peft_type": next(k for k, v in _PEFT_TYPES.items() if v == adapter.method),
              "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
              "revision": None, "inference_mode": True, **config}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_safetensors({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
                     directory / WEIGHTS_FILE, metadata={"format": "pt"})


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def _target_options(active: dict[str, np.ndarray], model: ModelConfig
                    ) -> tuple[list[str], list[int] | None]:
    """(target_modules, layers_to_transform) selecting exactly the active (module, layer)
    pairs: module names plus layer indices where every module has the same layers, else
    the full module paths."""
    layer_sets = {tuple(np.flatnonzero(a)) for a in active.values()}
    if len(layer_sets) == 1:
        layers = [int(i) for i in layer_sets.pop()]
        num_layers = len(next(iter(active.values())))
        return list(active), None if len(layers) == num_layers else layers
    return [linear_site(model, m).path(int(i)) for m, a in active.items()
            for i in np.flatnonzero(a)], None


def _key(model: ModelConfig, layer: int, module: str, name: str) -> str:
    return f"{_PREFIX}{linear_site(model, module).path(layer)}.{name}"


def _owner(site) -> str:
    """The HF module holding a parameter site's parameter, where PEFT's ParamWrapper keeps
    its tensors: `mlp.experts` for `mlp.experts.gate_up_proj`, `mlp.gate` for the router's
    `mlp.gate.weight`."""
    return site.hf_path.rpartition(".")[0]


def _tensor_key(model: ModelConfig, layer: int, module: str, name: str,
                wrapped=frozenset()) -> str:
    """The key PEFT saves a LoRA tensor of `module` in `layer` under. For a parameter site
    `wrapped` names the parameter sites targeted in that layer: PEFT wraps a module's
    targeted parameters in the order the module registers them, each wrapper around the
    last (transformers registers gate_up_proj before down_proj, the order jft declares the
    sites in), so a parameter's tensors sit under one `base_layer.` per wrapper outside it."""
    site = linear_site(model, module)
    if not site.parameter:
        return _key(model, layer, module, name)
    nested = [s.name for s in linear_sites(model)
              if s.parameter and s.name in wrapped and _owner(s) == _owner(site)]
    depth = len(nested) - 1 - nested.index(module)
    return f"{_PREFIX}{HF_LAYER.format(i=layer)}{_owner(site)}.{'base_layer.' * depth}{name}"


def _parameter_targets(active: dict[str, np.ndarray], model: ModelConfig) -> list[str]:
    """target_parameters selecting exactly the active (parameter site, layer) pairs: the
    parameter's path where every layer has it, else its full path per layer (PEFT's
    layers_to_transform leaves target_parameters alone)."""
    targets = []
    for module, mask in active.items():
        site = linear_site(model, module)
        targets += [site.hf_path] if mask.all() else [site.path(int(i))
                                                       for i in np.flatnonzero(mask)]
    return targets


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _lora_to_peft(delta, config, model):
    plans = lora_method.plan(model, config)
    parameters = [m for m in plans if linear_site(model, m).parameter]
    if config.dora and parameters:
        raise JftError(f"lora with dora on {parameters[0]} cannot be written as a PEFT "
                       "adapter: PEFT reaches it through target_parameters, whose ParamWrapper "
                       "has no DoRA; export it with --format merged")
    rebased = any("init_a" in entry for entry in delta["layers"].values())
    tensors = {}
    for module, p in plans.items():
        entry = delta["layers"][module]
        groups = math.prod(linear_site(model, module).group_shape(model))
        for layer, rank in enumerate(p.ranks):
            if not rank:
                continue
            a, b = _lora_factors(entry["a"][layer], entry["b"][layer], rank, groups)
            if rebased:  # the update over the original base: A B - A0 B0 = [A; A0] [B, -B0]
                a0, b0 = (_lora_factors(entry["init_a"][layer], entry["init_b"][layer], rank,
                                        groups)
                          if "init_a" in entry else (np.zeros_like(a), np.zeros_like(b)))
                a, b = np.concatenate([a, a0], -1), np.concatenate([b, -b0], 1)
            wrapped = {m for m in parameters if plans[m].ranks[layer]}
            lora_a, lora_b = _peft_factors(a, b)
            tensors[_tensor_key(model, layer, module, "lora_A.weight", wrapped)] = lora_a
            tensors[_tensor_key(model, layer, module, "lora_B.weight", wrapped)] = lora_b
            if config.dora:
                tensors[_key(model, layer, module, "lora_magnitude_vector")] = (
                    entry["magnitude"][layer].reshape(-1))
    targets, layers = _target_options({m: np.asarray(p.ranks) > 0 for m, p in plans.items()
                                       if m not in parameters}, model)
    rank_factor = 2 if rebased else 1
    alpha_factor = (math.sqrt(2) if config.rslora else 2) if rebased else 1
    return {
        "r": config.r * rank_factor, "lora_alpha": _number(config.alpha * alpha_factor),
        # PEFT's ParamWrapper refuses dropout (it cannot drop the input of a weight it
        # rewrites) and will not load such an adapter; dropout changes no output after
        # training, so the adapter is written without it.
        "lora_dropout": 0.0 if parameters else config.dropout,
        "use_rslora": config.rslora, "use_dora": config.dora,
        # [] rather than None where only parameters are targeted: PEFT fills None with its
        # default modules for the model type.
        "target_modules": targets, "layers_to_transform": layers,
        "target_parameters": _parameter_targets(
            {m: np.asarray(plans[m].ranks) > 0 for m in parameters}, model) or None,
        "rank_pattern": {k: v * rank_factor for k, v in config.rank_pattern},
        "alpha_pattern": {k: _number(v * alpha_factor) for k, v in config.alpha_pattern},
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None,
    }, tensors


def _lora_factors(a, b, rank, groups=1):
    """jft's a [*group, *in, R], b [*group, R, *out] cut to `rank`, per expert: [G, in,
    rank], [G, rank, out] (G = 1 for a linear that is not an expert stack)."""
    return (a.reshape(groups, -1, a.shape[-1])[..., :rank],
            b.reshape(groups, a.shape[-1], -1)[:, :rank])


def _peft_factors(a, b):
    """Per-expert a [G, in, r], b [G, r, out] as PEFT's lora_A [G r, in] (row g r + j)
    and lora_B [out, r G] (column j G + g), ParamWrapper's layouts; for G = 1 those of a
    plain linear, [r, in] and [out, r]."""
    return (a.transpose(0, 2, 1).reshape(-1, a.shape[1]),
            b.transpose(2, 1, 0).reshape(b.shape[2], -1))


def _ia3_to_peft(delta, config, model):
    plans = ia3_method.plan(model, config)
    parameters = [m for m in plans if linear_site(model, m).parameter]
    if parameters:
        raise JftError(f"ia3 on {parameters[0]} cannot be written as a PEFT adapter: PEFT "
                       "reaches it only through target_parameters, which its IA3 lacks; "
                       "export it with --format merged")
    tensors = {}
    for module, p in plans.items():
        for layer in np.flatnonzero(p.mask()):
            scale = delta["layers"][module][layer].reshape(-1)
            tensors[_key(model, int(layer), module, "ia3_l")] = (
                scale[None, :] if p.feedforward else scale[:, None])
    targets, layers = _target_options({m: p.mask() for m, p in plans.items()}, model)
    if layers is not None:  # PEFT's IA3 has no layers_to_transform: name the paths
        targets = [linear_site(model, m).path(i) for m in targets for i in layers]
    feedforward = [t for t in targets if plans[t.rsplit(".", 1)[-1]].feedforward]
    return {"target_modules": targets, "feedforward_modules": feedforward,
            "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None}, tensors


def _prompt_to_peft(delta, config, model):
    return {"num_virtual_tokens": config.num_virtual_tokens, "token_dim": model.embed_dim,
            "num_transformer_submodules": 1, "num_attention_heads": model.num_heads,
            "num_layers": model.num_layers, "prompt_tuning_init": "RANDOM"
            }, prompt_tuning.to_peft(delta)


def _prefix_to_peft(delta, config, model):
    token_dim = prefix_tuning.token_dim(model)
    return {"num_virtual_tokens": config.num_virtual_tokens, "token_dim": token_dim,
            "num_transformer_submodules": 1, "num_attention_heads": model.num_kv_heads,
            "num_layers": model.num_layers, "encoder_hidden_size": token_dim,
            "prefix_projection": False}, prefix_tuning.to_peft(delta)


# ---------------------------------------------------------------- reading


def read_peft_adapter(directory, base, model: ModelConfig):
    """(method, config, delta) of a PEFT adapter directory for this architecture. Tensors
    that do not fit the model and options jft does not implement are refused, naming the
    first key at fault. `jft.formats.adapters.load_adapter` places and applies it."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    options = read_peft_config(directory)
    peft_type = options.get("peft_type")
    method = _PEFT_TYPES.get(peft_type) if isinstance(peft_type, str) else None
    if method is None:
        raise JftError(f"{config_path}: peft_type {options.get('peft_type')!r} is not supported; "
                       f"valid: {', '.join(_PEFT_TYPES)}")
    _check_options(options, method, config_path)
    if not weights_path.is_file():
        found = "adapter_model.bin (convert it to safetensors)" if (
            directory / "adapter_model.bin").is_file() else "nothing"
        raise JftError(f"{directory}: no {WEIGHTS_FILE}; found {found}")
    # jft's own reader: it names the file when the header is corrupt or the data truncated,
    # and reads bfloat16, which the safetensors package's numpy backend cannot.
    file = SafetensorsFile(weights_path)
    tensors = {k: file.read(k, np.float32) for k in sorted(file.names())}
    reader = {"lora": _lora_from_peft, "ia3": _ia3_from_peft, "prompt_tuning": _prompt_from_peft,
              "prefix_tuning": _prefix_from_peft}[method]
    delta, config = reader(options, tensors, base, model, weights_path)
    return method, config, delta


def read_peft_config(directory) -> dict:
    """The options of a PEFT adapter directory's adapter_config.json, a JSON object."""
    from jft.formats.adapters import read_config_object

    return read_config_object(Path(directory) / CONFIG_FILE, "PEFT adapter")


def _check_options(options, method, config_path):
    for key, value in options.items():
        if key in _COMMON_KEYS or key in _KNOWN_KEYS[method]:
            continue
        if value not in (None, False, [], {}, "none"):
            raise JftError(f"{config_path}: {key}={value!r} is not supported by jft's {method}")
    if method == "lora" and options.get("init_lora_weights", True) not in _PLAIN_LORA_INITS:
        raise JftError(
            f"{config_path}: init_lora_weights={options['init_lora_weights']!r} pairs the "
            "adapter with a rewritten base that is not saved with it; save it with PEFT's "
            "path_initial_model_for_weight_conversion to get a plain LoRA")
    if method == "lora" and options.get("target_parameters"):
        # PEFT's ParamWrapper (target_parameters) refuses these; no adapter PEFT saved has them.
        if options.get("lora_dropout"):
            raise JftError(f"{config_path}: lora_dropout={options['lora_dropout']!r} with "
                           "target_parameters: PEFT's ParamWrapper refuses dropout; set it to 0")
        if options.get("use_dora"):
            raise JftError(f"{config_path}: use_dora={options['use_dora']!r} with "
                           "target_parameters: PEFT's ParamWrapper has no DoRA (on routers "
                           "and expert stacks); target them with plain LoRA")
    if method in ("prompt_tuning", "prefix_tuning"):
        if options.get("task_type") != "CAUSAL_LM":
            raise JftError(f"{config_path}: task_type={options.get('task_type')!r}; jft reads "
                           "prompt-learning adapters for CAUSAL_LM only")
        if options.get("num_transformer_submodules", 1) != 1:
            raise JftError(f"{config_path}: num_transformer_submodules="
                           f"{options['num_transformer_submodules']} (encoder-decoder); "
                           "jft models are decoder-only")


def _mismatch(path, key, found, expected) -> JftError:
    return JftError(f"{path}: tensor {key} has shape {tuple(found)}, expected {tuple(expected)}")


def _module_sites(model: ModelConfig):
    """The linears PEFT reaches as modules (target_modules): all but the parameter sites."""
    return tuple(site for site in linear_sites(model) if not site.parameter)


def _split_key(key: str, names, model) -> tuple[int, str, str] | None:
    """(layer, module, tensor name) of a key `<prefix>model.layers.<i>.<HF path>.<name>`
    naming one of the model's linears and one of `names`, else None."""
    match = _LAYER_KEY.fullmatch(key)
    if not match:
        return None
    for site in _module_sites(model):
        for name in names:
            if match[2] == f"{site.hf_path}.{name}" and match[1] == str(int(match[1])):
                return int(match[1]), site.name, name
    return None


def _layer_tensors(tensors, names, model, path):
    """{(module, layer): {name: tensor}} from per-module keys, checked against the model."""
    grouped: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        parts = _split_key(key, names, model)
        if parts is None:
            modules = ", ".join(site.name for site in _module_sites(model))
            parameters = [site.hf_path for site in linear_sites(model) if site.parameter]
            raise JftError(f"{path}: unexpected tensor {key}; jft reads "
                           f"{'/'.join(names)} of {modules} under "
                           f"{_PREFIX}model.layers.<i>"
                           + (f", and of {', '.join(parameters)} where LoRA's "
                              "target_parameters names them" if parameters else ""))
        layer, module, name = parts
        if layer >= model.num_layers:
            raise JftError(f"{path}: tensor {key} is for layer {layer}, but the model has "
                           f"layers 0..{model.num_layers - 1}")
        grouped.setdefault((module, layer), {})[name] = value
    return grouped


def _peft_matches(spec, module_key: str) -> bool:
    """PEFT's target_modules / exclude_modules rule: a string is fullmatched (or is
    "all-linear"), a list entry equals the module path or ends it after a dot."""
    if isinstance(spec, str):
        return spec == "all-linear" or re.fullmatch(spec, module_key) is not None
    return module_key in spec or any(module_key.endswith("." + t) for t in spec)


def _peft_targeted(options, model) -> set[tuple[str, int]] | None:
    """The (module, layer) pairs target_modules selects among the linears PEFT sees as
    modules (None: it names none). layers_to_transform filters suffix matches only, as in
    PEFT."""
    targets, excluded = options.get("target_modules"), options.get("exclude_modules")
    if targets is None:
        return None
    layers = options.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    chosen = set()
    for site in _module_sites(model):
        module = site.name
        for layer in range(model.num_layers):
            key = site.path(layer)
            by_layer = not layers or isinstance(targets, str) or key in targets or layer in layers
            if (_peft_matches(targets, key) and by_layer
                    and not (excluded and _peft_matches(excluded, key))):
                chosen.add((module, layer))
    return chosen


def _check_coverage(grouped, options, model, path, names):
    missing = sorted((_peft_targeted(options, model) or set()) - set(grouped),
                     key=lambda pair: (pair[1], pair[0]))
    if missing:
        module, layer = missing[0]
        raise JftError(f"{path}: lacks tensor {_key(model, layer, module, names[0])}, which "
                       "target_modules selects")
    for (module, layer), entry in grouped.items():
        for name in names:
            if name not in entry:
                raise JftError(f"{path}: lacks tensor {_key(model, layer, module, name)}")


def _jft_targets(pairs, model) -> Targets:
    """jft Targets selecting exactly these (module, layer) pairs: linears by name (and
    layers) or by a regex of their paths, parameter sites as target_parameters."""
    names = [site.name for site in linear_sites(model)]
    active = {m: np.zeros(model.num_layers, bool) for m in names
              if any(m == module for module, _ in pairs)}
    for module, layer in pairs:
        active[module][layer] = True
    parameters = tuple(_parameter_targets(
        {m: a for m, a in active.items() if linear_site(model, m).parameter}, model))
    modules = {m: a for m, a in active.items() if not linear_site(model, m).parameter}
    if not modules:
        return Targets((), None, parameters)
    targets, layers = _target_options(modules, model)
    if layers is not None and parameters:  # jft's layers would filter the parameters too
        targets = [linear_site(model, m).path(i) for m in targets for i in layers]
    if all(t in names for t in targets):
        return Targets(tuple(targets), None if layers is None else tuple(layers), parameters)
    return Targets("|".join(re.escape(t) for t in targets), None, parameters)


def _peft_parameters(options, model, config_path) -> set[tuple[str, int]]:
    """The (parameter site, layer) pairs target_parameters selects, by PEFT's rule (the
    whole parameter path, or a suffix after a dot; in every layer, whatever
    layers_to_transform says). An entry naming no router or expert stack is refused."""
    wanted = options.get("target_parameters") or []
    if isinstance(wanted, str) or not all(isinstance(w, str) for w in wanted):
        raise JftError(f"{config_path}: target_parameters={wanted!r} must be a list of "
                       "parameter paths")
    sites = [site for site in linear_sites(model) if site.parameter]
    chosen = set()
    for entry in wanted:
        found = {(site.name, layer) for site in sites for layer in range(model.num_layers)
                 if site.path(layer) == entry or site.path(layer).endswith("." + entry)}
        if not found:
            valid = ", ".join(site.hf_path for site in sites) or "none (a dense model)"
            raise JftError(f"{config_path}: target_parameters entry {entry!r} names no "
                           f"parameter jft adapts in {model.family}; valid: {valid}")
        chosen |= found
    return chosen


def _peft_pattern(pattern: dict, path: str, default):
    """PEFT's rank/alpha pattern lookup: the first key (in file order) ending the path."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _lora_from_peft(options, tensors, base, model, path):
    dora = bool(options.get("use_dora"))
    names = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if dora else ())
    # Parameter sites' keys follow from target_parameters (their nesting says which
    # parameter a tensor is for; the key does not name it); the rest are modules' keys.
    parameters = _peft_parameters(options, model, path.parent / CONFIG_FILE)
    keys = {(module, layer, name): _tensor_key(model, layer, module, name,
                                               {m for m, i in parameters if i == layer})
            for module, layer in parameters for name in names[:2]}
    grouped = _layer_tensors({k: v for k, v in tensors.items() if k not in keys.values()},
                             names, model, path)
    for (module, layer, name), key in sorted(keys.items(), key=lambda item: item[1]):
        if key not in tensors:
            raise JftError(f"{path}: lacks tensor {key}, which target_parameters selects")
        grouped.setdefault((module, layer), {})[name] = tensors[key]
    if not grouped:
        raise JftError(f"{path}: holds no LoRA tensors")
    _check_coverage(grouped, options, model, path, names)
    r, alpha = int(options.get("r", 8)), float(options.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = {}, {}
    for (module, layer), entry in grouped.items():
        site = linear_site(model, module)
        size_in, size_out = site.sizes(model)
        groups = math.prod(site.group_shape(model))
        module_key = site.path(layer)
        rank = _peft_pattern(options.get("rank_pattern"), module_key, r)
        expected = {"lora_A.weight": (rank * groups, size_in),
                    "lora_B.weight": (size_out, rank * groups),
                    "lora_magnitude_vector": (size_out,)}
        for name, value in entry.items():
            if value.shape != expected[name]:
                raise _mismatch(path, keys.get((module, layer, name),
                                               _key(model, layer, module, name)),
                                value.shape, expected[name])
        # Explicit per-path patterns: jft and PEFT then agree whatever the key order.
        if rank != r:
            rank_pattern[re.escape(module_key)] = rank
        layer_alpha = _peft_pattern(options.get("alpha_pattern"), module_key, alpha)
        if layer_alpha != alpha:
            alpha_pattern[re.escape(module_key)] = float(layer_alpha)
    config = lora_method.LoraConfig(
        r=r, alpha=alpha, targets=_jft_targets(set(grouped), model),
        dropout=float(options.get("lora_dropout", 0.0)), rslora=bool(options.get("use_rslora")),
        dora=dora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    layers = {}
    for module, p in lora_method.plan(model, config).items():
        site = linear_site(model, module)
        dims_in, dims_out = site.dims(model)
        group = site.group_shape(model)
        L, G, R = model.num_layers, math.prod(group), p.max_rank
        a = np.zeros((L, G, math.prod(dims_in), R), np.float32)
        b = np.zeros((L, G, R, math.prod(dims_out)), np.float32)
        for layer, rank in enumerate(p.ranks):
            if rank:  # PEFT's lora_A [G rank, in] and lora_B [out, rank G] (_peft_factors)
                entry = grouped[module, layer]
                a[layer, :, :, :rank] = entry["lora_A.weight"].reshape(G, rank, -1).transpose(
                    0, 2, 1)
                b[layer, :, :rank] = entry["lora_B.weight"].reshape(-1, rank, G).transpose(
                    2, 1, 0)
        layers[module] = {"a": a.reshape(L, *group, *dims_in, R),
                          "b": b.reshape(L, *group, R, *dims_out)}
    if dora:  # untargeted layers keep the base's column norms, so DoRA leaves them alone
        for module, entry in layers.items():
            site = linear_site(model, module)
            in_axes = tuple(range(1, 1 + len(site.in_axes)))
            weight = site.to_in_out(jnp.asarray(base["layers"][module], jnp.float32), lead=1)
            magnitude = np.array(jnp.sqrt(jnp.sum(jnp.square(weight), axis=in_axes)))
            for layer in np.flatnonzero(lora_method.plan(model, config)[module].ranks):
                magnitude[layer] = grouped[module, int(layer)]["lora_magnitude_vector"].reshape(
                    magnitude.shape[1:])
            entry["magnitude"] = magnitude
    return {"layers": layers}, config


def _ia3_from_peft(options, tensors, base, model, path):
    grouped = _layer_tensors(tensors, ("ia3_l",), model, path)
    if not grouped:
        raise JftError(f"{path}: holds no IA3 tensors")
    _check_coverage(grouped, options, model, path, ("ia3_l",))
    feedforward_spec = options.get("feedforward_modules") or []
    feedforward = set()
    for (module, layer), entry in grouped.items():
        module_key = linear_site(model, module).path(layer)
        if isinstance(feedforward_spec, str):
            is_feedforward = re.fullmatch(feedforward_spec, module_key) is not None
        else:
            is_feedforward = any(module_key.endswith(t) for t in feedforward_spec)
        size_in, size_out = linear_site(model, module).sizes(model)
        expected = (1, size_in) if is_feedforward else (size_out, 1)
        if entry["ia3_l"].shape != expected:
            raise _mismatch(path, _key(model, layer, module, "ia3_l"), entry["ia3_l"].shape,
                            expected)
        if is_feedforward:
            feedforward.add(module)
    config = ia3_method.IA3Config(targets=_jft_targets(set(grouped), model),
                                  feedforward=tuple(s.name for s in linear_sites(model)
                                                    if s.name in feedforward))
    layers = {}
    for module, p in ia3_method.plan(model, config).items():
        dims_in, dims_out = linear_site(model, module).dims(model)
        dims = dims_in if p.feedforward else dims_out
        scale = np.ones((model.num_layers, *dims), np.float32)
        for layer in np.flatnonzero(p.mask()):
            scale[layer] = grouped[module, int(layer)]["ia3_l"].reshape(dims)
        layers[module] = scale
    return {"layers": layers}, config


def _prompt_tensor(tensors, path, expected):
    if set(tensors) != {"prompt_embeddings"}:
        extra = sorted(set(tensors) - {"prompt_embeddings"})
        raise JftError(f"{path}: " + (f"unexpected tensor {extra[0]}" if extra
                                      else "lacks tensor prompt_embeddings"))
    found = tensors["prompt_embeddings"].shape
    if found != expected:
        raise _mismatch(path, "prompt_embeddings", found, expected)


def _prompt_from_peft(options, tensors, base, model, path):
    config = prompt_tuning.PromptTuningConfig(int(options["num_virtual_tokens"]))
    _prompt_tensor(tensors, path, (config.num_virtual_tokens, model.embed_dim))
    return prompt_tuning.from_peft(tensors, model, config), config


def _prefix_from_peft(options, tensors, base, model, path):
    # PEFT saves the projected prefix whatever prefix_projection was: the plain form.
    config = prefix_tuning.PrefixTuningConfig(int(options["num_virtual_tokens"]))
    expected = (config.num_virtual_tokens,
                model.num_layers * 2 * prefix_tuning.token_dim(model))
    _prompt_tensor(tensors, path, expected)
    return prefix_tuning.from_peft(tensors, model, config), config

