"""The training config: a typed schema for `python -m jft.train CONFIG.yaml [key.sub=value ...]`.

`load_config` reads the YAML file, applies dotted overrides and validates everything up
front (unknown keys, wrong types, impossible combinations, the method's own options), so a
run never fails minutes in on a typo. Every key is documented in docs/config.md.
`build_optimizer` / `build_schedule` turn the `train` section into an optax optimizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import jax
import optax
import yaml

from jft.errors import ConfigValueError, JftError
from jft.storage import check_creatable
from jft.training.data import DataConfig

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Remat = Literal["none", "full", "dots", "dots_no_batch"]
Kernels = Literal["auto", "pallas", "xla"]
Quantize = Literal["none", "nf4", "fp4", "int8"]  # as jft.quant.QUANTIZE_CHOICES
Schedule = Literal["cosine", "linear", "constant"]
Optimizer = Literal["adamw", "sgd", "adafactor", "lion"]

BUNDLED_MODELS = ("smollm2-135m-instruct", "gemma3-270m")  # as jft.formats.bundled.BUNDLED

# Keys that do not change what a run computes, so an existing output_dir still holds the
# same run when only these differ (see fingerprint() and docs/config.md).
FINGERPRINT_EXCLUDED = (
    "remat",
    "kernels",
    "output_dir",
    "train.steps",
    "train.log_every",
    "train.max_bad_steps",
    "data.eval",
    "eval",
    "checkpoint",
    "mesh",
    "moe.impl",
)


def _required(**metadata):
    return dataclasses.field(metadata=dict(required=True, **metadata))


def _field(default, **metadata):
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class MethodSection:
    """`method`: the PEFT method's name, its typed config (e.g. a LoraConfig, built and
    validated once by jft.peft.make_config) and calibration batches for data-driven inits."""

    name: str = "lora"
    calibration_batches: int = _field(8, min=1)
    config: Any = None  # the method's Config; None: its defaults

    def __post_init__(self):
        if self.config is None:
            from jft.peft import make_config

            object.__setattr__(self, "config", make_config(self.name, {}))

    @property
    def options(self) -> dict[str, Any]:
        """The config as plain values, every option with its default (what the run's
        config.yaml and checkpoints record)."""
        from jft.peft.factory import config_to_options

        return config_to_options(self.config)

    @property
    def needs_calibration(self) -> bool:
        from jft.peft import get_method

        return get_method(self.name).needs_calibration(self.config)


@dataclasses.dataclass(frozen=True)
class ObjectiveSection:
    """`objective`: what a step minimises, by name (`objective: dpo`) or with options
    (`objective: {name: dpo, beta: 0.1}`); `config` is the objective's typed Config."""

    name: str = "sft"
    config: Any = None  # the objective's Config; None: its defaults

    def __post_init__(self):
        if self.config is None:
            from jft.objectives import get_objective

            object.__setattr__(self, "config", get_objective(self.name).Config())

    @property
    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    @property
    def kind(self) -> type:
        from jft.objectives import get_objective

        return get_objective(self.name)

    def build(self):
        """The objective, ready for `ShardedSteps`."""
        return self.kind(self.config)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """`train`: steps, batch, optimizer and schedule."""

    steps: int = _field(100, min=1)
    batch_size: int = _field(8, min=1)
    grad_accum: int = _field(1, min=1)
    learning_rate: float = _field(2e-4, above=0.0)
    schedule: Schedule = "cosine"
    warmup_steps: int = _field(0, min=0)
    min_lr_ratio: float = _field(0.0, min=0.0, max=1.0)
    weight_decay: float = _field(0.0, min=0.0)
    # The delta leaves weight decay applies to, by name (`[b]`: LoRA's B alone, STAR's
    # calibration); None: every trainable leaf.
    weight_decay_on: list[str] | None = None
    grad_clip: float = _field(1.0, min=0.0)
    optimizer: Optimizer = "adamw"
    beta1: float | None = _field(None, min=0.0, below=1.0)
    beta2: float | None = _field(None, min=0.0, below=1.0)
    momentum: float = _field(0.0, min=0.0, below=1.0)
    seed: int = 0
    max_bad_steps: int = _field(10, min=1)
    log_every: int = _field(1, min=1)


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """`eval`: held-out loss (and optionally generations) on data.eval."""

    every: int = _field(0, min=0)
    generate: bool = False
    max_new_tokens: int = _field(64, min=1)
    batch_size: int | None = _field(None, min=1)
    max_examples: int | None = _field(None, min=1)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """`checkpoint`: how often to save and how many to keep."""

    every: int = _field(0, min=0)
    keep: int = _field(3, min=1)


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """`mesh`: the (data, fsdp, tensor) device mesh and how logical axes map onto it."""

    data: int = _field(1, min=-1)
    fsdp: int = _field(-1, min=-1)  # the default: every device shards the params (FSDP)
    tensor: int = _field(1, min=-1)
    preset: str = "fsdp_tp"
    # logical axis -> mesh axis, a list of them, or null: replaces the preset's entry
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)

    def mesh_config(self):
        from jft.sharding import MeshConfig

        return MeshConfig(self.data, self.fsdp, self.tensor, self.preset, dict(self.rules))


@dataclasses.dataclass(frozen=True)
class MoeSection:
    """`moe`: how a mixture-of-experts model's routed experts run, and what its router adds
    to the training loss (ignored by dense models)."""

    impl: Literal["grouped", "dense"] = "grouped"
    # The load-balancing loss's weight; null: the checkpoint's router_aux_loss_coef.
    aux_loss_coef: float | None = _field(None, min=0)
    z_loss_coef: float = _field(0.0, min=0)  # the router z-loss's weight (ST-MoE: 0.001)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The whole resolved config of one run."""

    model: str = _required()
    model_dtype: Dtype = "auto"
    compute_dtype: Dtype = "auto"
    remat: Remat = "none"
    kernels: Kernels = "auto"
    quantize: Quantize = "none"
    quantize_block: int = _field(64, min=32)
    double_quant: bool = True
    quantize_embeddings: bool = False
    objective: ObjectiveSection = dataclasses.field(default_factory=ObjectiveSection)
    method: MethodSection = dataclasses.field(default_factory=MethodSection)
    data: DataConfig = _required()
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    moe: MoeSection = dataclasses.field(default_factory=MoeSection)
    output_dir: str = _required()

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML/JSON values; `from_dict` reads it back."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ObjectiveSection):  # a bare name when it has no options
                out[f.name] = ({"name": value.name, **_plain(value.options)}
                               if value.options else value.name)
            elif isinstance(value, MethodSection):
                out[f.name] = {
                    "name": value.name,
                    "calibration_batches": value.calibration_batches,
                    **_plain(value.options),
                }
            elif dataclasses.is_dataclass(value):
                out[f.name] = _plain(dataclasses.asdict(value))
            else:
                out[f.name] = value
        return out

    def fingerprint(self) -> str:
        """A stable hash of what defines the run: every key but FINGERPRINT_EXCLUDED.

        The method's options are resolved (defaults filled in, ints in float options
        made floats), so spelling out a default (`r: 8`) keeps the fingerprint.
        """
        resolved = self.to_dict()
        if resolved["objective"] == "sft":  # the default: runs from before the key resume
            del resolved["objective"]
        # likewise (and `impl` never counts: it changes how, not what, a run computes)
        if {**resolved["moe"], "impl": "grouped"} == _plain(dataclasses.asdict(MoeSection())):
            del resolved["moe"]
        if resolved["train"]["weight_decay_on"] is None:  # likewise
            del resolved["train"]["weight_decay_on"]
        if resolved["quantize"] == "none":  # likewise, and then the other keys do nothing
            for key in ("quantize", "quantize_block", "double_quant", "quantize_embeddings"):
                del resolved[key]
        return fingerprint_of(resolved, FINGERPRINT_EXCLUDED)


def base_settings(run: Path) -> dict[str, Any]:
    """How the run at `run` (a `python -m jft.train` directory, or a checkpoint in it)
    loaded its base, as `jft.load` keywords: its `quantize*` keys, and `loftq` (the
    LoRA config) when LoftQ chose the quantized weights. {} for a float base, or for
    anything that is not a run."""
    run = Path(run)
    if run.parent.name == "checkpoints":
        run = run.parents[1]
    try:
        raw, _ = read_config_file(str(run / "config.yaml"))
        raw.pop("fingerprint", None)  # the run directory's record (run_dir.py)
        config = from_dict(raw, check_paths=False)
    except (JftError, OSError):
        return {}
    if config.quantize == "none":
        return {}
    settings = dict(quantize=config.quantize, quantize_block=config.quantize_block,
                    double_quant=config.double_quant,
                    quantize_embeddings=config.quantize_embeddings)
    if getattr(config.method.config, "init", None) == "loftq":
        settings["loftq"] = config.method.config
    return settings


def fingerprint_of(resolved: dict, excluded: Sequence[str]) -> str:
    """A stable hash of a resolved config without its `excluded` dotted keys."""
    resolved = json.loads(json.dumps(resolved))  # a copy to prune
    for dotted in excluded:
        *parents, last = dotted.split(".")
        node = resolved
        for part in parents:  # a section left out as default has nothing to exclude
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    text = json.dumps(resolved, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """safe_load, but `1e-4` is a float (YAML 1.1 wants `1.0e-4`, so PyYAML reads a str)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_config(
    path: str | None, overrides: Sequence[str] = (), *, check_paths: bool = True
) -> TrainConfig:
    """Reads CONFIG.yaml (or nothing, with path None), applies `a.b=value` overrides, validates.

    Values of overrides are parsed as YAML (`train.steps=10`, `eval.generate=true`,
    `method.targets=[q_proj,v_proj]`, `data.eval=null`). check_paths: the model (unless
    bundled) and the data files must exist. Any problem is a JftError naming the key.
    """
    raw, applied = read_config_file(path, overrides)
    return from_dict(raw, source=str(path) if path is not None else "config",
                     overrides=applied, check_paths=check_paths)


def read_config_file(path: str | None, overrides: Sequence[str] = ()
                     ) -> tuple[dict, dict[str, str]]:
    """(the YAML file's mapping with the overrides applied, {dotted key: override})."""
    raw: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise JftError(f"config file {path} does not exist") from None
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
            raise JftError(f"config file {path} cannot be read: {error}") from None
        try:
            loaded = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as error:
            message = " ".join(str(error).split())
            raise JftError(f"config file {path} is not valid YAML: {message}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise JftError(
                f"config file {path} must be a mapping of keys (model: ..., data: ...), "
                f"got a {type(loaded).__name__}"
            )
        raw = loaded
    applied = {}
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(raw, key, value, override)
        applied[key] = override
    return raw, applied


def from_dict(
    raw: Mapping[str, Any],
    source: str = "config",
    overrides: Mapping[str, str] | None = None,
    *,
    check_paths: bool = True,
) -> TrainConfig:
    """Validates a config mapping (e.g. a loaded YAML, or `TrainConfig.to_dict()`).

    source names the file in errors; overrides maps dotted keys to the override that set
    them, so errors about those keys name the override instead.
    """
    context = _Context(source, dict(overrides or {}))
    if not isinstance(raw, Mapping):
        context.fail("", f"the config must be a mapping of keys, got {raw!r}")
    config = _build(TrainConfig, raw, "", context)
    _check_combinations(config, context, check_paths)
    return config


def _parse_override(override: str) -> tuple[str, Any]:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise JftError(
            f"override {override!r} must look like key.sub=value (e.g. train.steps=10)"
        )
    try:
        value = yaml.load(text, Loader=_Loader) if text.strip() else None
    except yaml.YAMLError as error:
        message = " ".join(str(error).split())
        raise JftError(f"override {override!r}: the value is not valid YAML: {message}") from None
    return key, value


def _set_dotted(raw: dict, key: str, value: Any, override: str) -> None:
    *parents, last = key.split(".")
    node = raw
    for depth, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif depth == 0 and part == "objective" and isinstance(child, str):
            child = node[part] = {"name": child}  # `objective: dpo` names it, with defaults
        elif not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise JftError(
                f"override {override!r}: {where} is a value ({child!r}), not a section of keys"
            )
        node = child
    node[last] = value


class _Context:
    def __init__(self, source: str, overrides: dict[str, str]):
        self.source = source
        self.overrides = overrides

    def fail(self, key: str, message: str) -> typing.NoReturn:
        where = self.source
        for dotted, override in self.overrides.items():
            if key and (
                dotted == key or key.startswith(dotted + ".") or dotted.startswith(key + ".")
            ):
                where = f"override {override!r}"
        raise JftError(f"{where}: {message}")


# ---------------------------------------------------------------------------- validation


def _build(cls, raw: Any, prefix: str, context: _Context):
    """One section from its mapping: unknown keys, required keys, types and bounds."""
    if raw is None:
        raw = {}
    if isinstance(raw, str) and cls is ObjectiveSection:
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        context.fail(prefix, f"{prefix} must be a section of keys, got {raw!r}")
    if cls is MethodSection:
        return _build_method(raw, context)
    if cls is ObjectiveSection:
        return _build_objective(raw, context)
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in raw:
        if key not in names:
            dotted = _join(prefix, key)
            where = f"in {prefix}" if prefix else "at the top level"
            context.fail(
                dotted, f"unknown config key {dotted!r}; valid keys {where}: {', '.join(names)}"
            )
    values = {}
    for f in fields:
        dotted = _join(prefix, f.name)
        kind = hints[f.name]
        if f.name not in raw and f.metadata.get("required"):
            context.fail(dotted, f"missing required key {dotted!r} ({_describe(kind)})")
        if dataclasses.is_dataclass(kind):  # absent sections resolve to their defaults
            values[f.name] = _build(kind, raw.get(f.name), dotted, context)
        elif f.name not in raw:
            continue
        else:
            values[f.name] = _check_value(kind, raw[f.name], dotted, context, f.metadata)
    try:  # a section's own checks (DataConfig's), reported against the file
        return cls(**values)
    except JftError as error:
        context.fail(prefix, str(error))


def _build_method(raw: Mapping, context: _Context) -> MethodSection:
    from jft.peft import REGISTRY, make_config

    name = _check_value(str, raw.get("name", "lora"), "method.name", context)
    if name not in REGISTRY:
        context.fail(
            "method.name",
            f"method.name {name!r} is not a method; valid: {', '.join(sorted(REGISTRY))}",
        )
    calibration = raw.get("calibration_batches", MethodSection.calibration_batches)
    calibration = _check_value(
        int, calibration, "method.calibration_batches", context, dict(min=1)
    )
    options = {
        str(k): v for k, v in raw.items() if k not in ("name", "calibration_batches")
    }
    hints = typing.get_type_hints(REGISTRY[name].Config)
    for key, value in list(options.items()):
        dotted = f"method.{key}"
        if key == "layers_to_transform" and "targets" in hints:
            options[key] = _check_value(list[int] | None, value, dotted, context, dict(min=0))
        elif key == "target_parameters" and "targets" in hints:
            options[key] = _check_value(list[str], value, dotted, context)
        elif key in hints:
            options[key] = _check_option(hints[key], value, dotted, context)
    try:
        peft = make_config(name, options)
    except JftError as error:
        message = str(error)
        key = _named_option(message, options)
        context.fail(f"method.{key}" if key else "method",
                     f"{'method.' + key if key else 'method'}: {message}")
    return MethodSection(name=name, calibration_batches=calibration, config=peft)


def _build_objective(raw: Mapping, context: _Context) -> ObjectiveSection:
    from jft.objectives import OBJECTIVES

    name = _check_value(str, raw.get("name", "sft"), "objective.name", context)
    if name not in OBJECTIVES:
        context.fail("objective.name", f"objective {name!r} is not one of: "
                     f"{', '.join(sorted(OBJECTIVES))}")
    options = {str(k): v for k, v in raw.items() if k != "name"}
    config = _build(OBJECTIVES[name].Config, options, "objective", context)
    return ObjectiveSection(name=name, config=config)


def _named_option(message: str, options: Mapping[str, Any]) -> str | None:
    """Which option a PEFT error is about: the one it quotes, else one it names."""
    quoted = re.findall(r"'([^']+)'", message)
    for word in quoted:
        if word in options:
            return word
    for key in options:
        if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", message):
            return key
    return None


def _check_option(kind, value, key: str, context: _Context):
    """A method option of a simple type (int, float, bool, str, lists of them) or targets."""
    from jft.peft import Targets

    if kind is Targets:
        return _check_value(str | list[str], value, key, context)
    if _is_simple(kind):
        return _check_value(kind, value, key, context)
    return value  # patterns, init_options, ...: make_config checks them


def _is_simple(kind) -> bool:
    if kind in (int, float, bool, str, type(None)):
        return True
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (Union, types.UnionType):
        return all(_is_simple(arg) for arg in args)
    if origin in (tuple, list):
        element = args[0] if args else Any
        return (origin is list or (len(args) == 2 and args[1] is Ellipsis)) and element in (
            int, float, bool, str
        )
    return origin is Literal


def _check_value(kind, value, key: str, context: _Context, bounds: Mapping | None = None):
    ok, converted = _conform(kind, value)
    if not ok:
        context.fail(key, f"{key} must be {_describe(kind)}, got {value!r}")
    bounds = bounds or {}
    for item in converted if isinstance(converted, list | tuple) else [converted]:
        if isinstance(item, bool) or not isinstance(item, int | float):
            continue
        if not math.isfinite(item):
            context.fail(key, f"{key} must be a finite number, got {item!r}")
        if "min" in bounds and item < bounds["min"]:
            context.fail(key, f"{key} must be at least {bounds['min']}, got {item!r}")
        if "max" in bounds and item > bounds["max"]:
            context.fail(key, f"{key} must be at most {bounds['max']}, got {item!r}")
        if "above" in bounds and item <= bounds["above"]:
            context.fail(key, f"{key} must be greater than {bounds['above']}, got {item!r}")
        if "below" in bounds and item >= bounds["below"]:
            context.fail(key, f"{key} must be less than {bounds['below']}, got {item!r}")
    return converted


def _conform(kind, value) -> tuple[bool, Any]:
    """(whether value has the type, the value converted: int to float, lists to tuples)."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if kind is Any:
        return True, value
    if kind is type(None):
        return value is None, value
    if origin is Literal:
        return (isinstance(value, str) and value in args), value
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, converted = _conform(arg, value)
            if ok:
                return True, converted
        return False, value
    if origin is dict:  # values checked by the section's own validation
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return False, value
        items = []
        for item in value:
            ok, converted = _conform(args[0], item)
            if not ok:
                return False, value
            items.append(converted)
        return True, tuple(items) if origin is tuple else items
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if kind is str:
        return isinstance(value, str), value
    return isinstance(value, kind), value


def _describe(kind) -> str:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is Literal:
        return "one of " + ", ".join(args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    if dataclasses.is_dataclass(kind) or origin is dict:
        return "a section of keys"
    return {
        int: "an integer", float: "a number", bool: "true or false", str: "a string",
        type(None): "null",
    }.get(kind, getattr(kind, "__name__", str(kind)))


def _check_combinations(config: TrainConfig, context: _Context, check_paths: bool) -> None:
    train, data, evaluation = config.train, config.data, config.eval
    _check_objective(config, context, check_paths)
    from jft.quant import BLOCK_SIZES

    if getattr(config.method.config, "init", None) == "loftq" and config.quantize == "none":
        context.fail("method.init", "method.init: loftq needs a quantized base: set quantize "
                     "(nf4, fp4 or int8)")
    if config.quantize_block not in BLOCK_SIZES:
        context.fail("quantize_block", f"quantize_block={config.quantize_block}; valid: "
                     f"{', '.join(map(str, BLOCK_SIZES))}")
    if train.warmup_steps > train.steps:
        context.fail(
            "train.warmup_steps",
            f"train.warmup_steps ({train.warmup_steps}) must be at most train.steps "
            f"({train.steps})",
        )
    if data.packing and data.max_length < 2:
        context.fail(
            "data.max_length",
            f"data.max_length must be at least 2 with data.packing, got {data.max_length}",
        )
    if evaluation.generate and data.eval is None:
        context.fail("eval.generate", "eval.generate needs data.eval (the held-out file)")
    if evaluation.every > 0 and data.eval is None:
        context.fail("eval.every", f"eval.every={evaluation.every} needs data.eval")
    if train.optimizer != "sgd" and train.momentum:
        context.fail(
            "train.momentum",
            f"train.momentum is for optimizer sgd only (optimizer is {train.optimizer}; "
            "use train.beta1)",
        )
    if train.optimizer == "sgd":
        for name in ("beta1", "beta2"):
            if getattr(train, name) is not None:
                context.fail(f"train.{name}", f"train.{name} is not used by optimizer sgd; "
                             "use train.momentum")
    if train.optimizer == "adafactor" and train.beta2 is not None:
        context.fail("train.beta2", "train.beta2 is not used by optimizer adafactor "
                     "(its second moment decays on its own schedule)")
    try:
        config.mesh.mesh_config().rule_table()
    except JftError as error:
        key = "mesh.preset" if "preset" in str(error) else "mesh.rules"
        context.fail(key, str(error))
    if not config.model:
        context.fail("model", "model must name a bundled model, an HF directory or a .gguf file")
    if not config.output_dir:
        context.fail("output_dir", "output_dir must be a directory path, got ''")
    if not check_paths:
        return
    try:
        check_creatable(config.output_dir, "output_dir")
    except JftError as error:
        context.fail("output_dir", str(error))
    model = Path(config.model)
    if config.model not in BUNDLED_MODELS:
        if not model.exists():
            context.fail(
                "model",
                f"model {config.model!r} is neither a bundled model "
                f"({', '.join(BUNDLED_MODELS)}) nor an existing HF directory or .gguf file",
            )
        if model.is_file() and model.suffix != ".gguf":
            context.fail("model", f"model {config.model} is a file but not a .gguf; give the "
                         "HF directory or a .gguf file")
    for key, file in (("data.train", data.train), ("data.eval", data.eval)):
        if file is not None and not Path(file).exists():
            context.fail(key, f"{key}: no such file {file}")


def _check_objective(config: TrainConfig, context: _Context, check_paths: bool) -> None:
    """The objective against the data format, the method and its own options."""
    from jft.objectives import OBJECTIVES
    from jft.peft import get_method
    from jft.training.data import PAIRED_FORMATS

    objective, data_format = config.objective, config.data.format
    kind, options = objective.kind, objective.config
    formats = kind.formats or tuple(f for f in typing.get_args(
        typing.get_type_hints(DataConfig)["format"]) if f not in PAIRED_FORMATS)
    if data_format not in formats:
        takes = [name for name, other in OBJECTIVES.items()
                 if data_format in (other.formats or ())]
        hint = (f" (format {data_format} is for objective {', '.join(takes)})"
                if data_format in PAIRED_FORMATS else "")
        context.fail("data.format", f"objective {objective.name} trains on data.format "
                     f"{' or '.join(formats)}, not {data_format}{hint}")
    if config.eval.generate and data_format == "kto":
        context.fail("eval.generate", "eval.generate needs reference answers; format kto has "
                     "none (its completions are marked desirable or not)")
    if (kind.samples and kind.uses_reference(options)
            and get_method(config.method.name).edits_base_weights):
        context.fail("objective.beta", f"objective.beta: objective {objective.name} compares "
                     "with the base without the adapter, and method "
                     f"{config.method.name} trains the base's own weights; set objective.beta "
                     "to 0")
    try:
        kind.check(options)
    except ConfigValueError as error:
        context.fail(error.key, str(error))
    reference = getattr(options, "reference", None)
    if reference is not None and check_paths:
        from jft.formats.adapters import check_adapter_exists

        try:
            check_adapter_exists(reference, "objective.reference")
        except JftError as error:
            context.fail("objective.reference", str(error))


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _plain(value):
    """Tuples to lists, recursively: what YAML and JSON write."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value




# ---------------------------------------------------------------------------- optimizer


def build_schedule(train: TrainSection, total_steps: int | None = None) -> optax.Schedule:
    """Learning rate per optimizer update: linear warmup from 0, then the decay.

    Warmup: lr(s) = peak · s / warmup_steps for s < warmup_steps. Then `cosine` decays
    to peak · min_lr_ratio at total_steps, `linear` likewise in a straight line, and
    `constant` stays at peak. total_steps defaults to train.steps.
    """
    total = train.steps if total_steps is None else total_steps
    peak = train.learning_rate
    warmup = min(train.warmup_steps, total)
    decay_steps = max(total - warmup, 1)
    if train.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, warmup + decay_steps,
                                                  end_value=peak * train.min_lr_ratio)
    if train.schedule == "linear":
        decay = optax.linear_schedule(peak, peak * train.min_lr_ratio, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def build_optimizer(
    train: TrainSection, total_steps: int | None = None, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
    """The optimizer of `train` with its schedule, after global-norm clipping when grad_clip > 0.

    adamw: decoupled weight decay, betas (0.9, 0.999), eps 1e-8. lion: betas (0.9, 0.99),
    decoupled weight decay. adafactor: factored second moments, no parameter-scale
    multiplication (learning_rate is the step size, as for the others), beta1 as its
    optional momentum. sgd: `momentum`, weight decay added to the gradient (L2).
    Gradient accumulation is separate: see wrap_accumulation. `schedule`: the one
    `build_schedule` gave, when the caller also reads it (the logged learning rate).
    """
    schedule = schedule or build_schedule(train, total_steps)
    wd, decayed = train.weight_decay, _decay_mask(train.weight_decay_on)
    if train.optimizer == "adamw":
        tx = optax.adamw(schedule, b1=_or(train.beta1, 0.9), b2=_or(train.beta2, 0.999),
                         eps=1e-8, weight_decay=wd, mask=decayed)
    elif train.optimizer == "lion":
        tx = optax.lion(schedule, b1=_or(train.beta1, 0.9), b2=_or(train.beta2, 0.99),
                        weight_decay=wd, mask=decayed)
    elif train.optimizer == "adafactor":
        tx = optax.adafactor(schedule, multiply_by_parameter_scale=False,
                             momentum=train.beta1, weight_decay_rate=wd or None,
                             weight_decay_mask=decayed)
    elif train.optimizer == "sgd":
        tx = optax.sgd(schedule, momentum=train.momentum or None)
        if wd:
            tx = optax.chain(optax.add_decayed_weights(wd, mask=decayed), tx)
    else:  # from_dict refuses other names; this guards hand-built sections
        raise JftError(
            f"train.optimizer {train.optimizer!r}; valid: {', '.join(typing.get_args(Optimizer))}"
        )
    if train.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(train.grad_clip), tx)
    return tx


def _decay_mask(names: Sequence[str] | None):
    """optax's weight-decay mask: True for the delta leaves named in `names`; None (every
    leaf) without names."""
    if names is None:
        return None
    wanted = set(names)

    def mask(params):
        def decayed(path, _):
            last = path[-1] if path else None
            return str(getattr(last, "key", getattr(last, "name", last))) in wanted

        return jax.tree_util.tree_map_with_path(decayed, params)

    return mask


def wrap_accumulation(
    tx: optax.GradientTransformation, grad_accum: int
) -> optax.GradientTransformation | optax.MultiSteps:
    """optax.MultiSteps averaging grad_accum micro-batch gradients per update; tx if 1.

    The inner optimizer (and so its schedule) advances once per real update.
    """
    if grad_accum < 1:
        raise JftError(f"train.grad_accum must be at least 1, got {grad_accum}")
    if grad_accum == 1:
        return tx
    return optax.MultiSteps(tx, every_k_schedule=grad_accum)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


__all__ = [
    "BUNDLED_MODELS", "CheckpointSection", "EvalSection",
    "FINGERPRINT_EXCLUDED", "MethodSection", "ObjectiveSection", "TrainConfig", "TrainSection",
    "build_optimizer", "build_schedule", "from_dict", "load_config", "wrap_accumulation",
]


def with_moe_settings(model, moe: MoeSection):
    """The ModelConfig with the run's `moe` section applied (a dense model unchanged)."""
    if model.moe is None:
        return model
    coef = model.moe.aux_loss_coef if moe.aux_loss_coef is None else moe.aux_loss_coef
    return model.replace(moe_impl=moe.impl, moe=dataclasses.replace(
        model.moe, aux_loss_coef=coef, z_loss_coef=moe.z_loss_coef))
