"""Loading an adapter, whatever its format: a `python -m jft.train` run directory (its
Orbax checkpoints), a PEFT adapter directory (`adapter_config.json`) or jft's own
(`jft_adapter.json`). Each format's reader gives (method, config, delta); placing the
delta and rebasing the base happen here, once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax

from jft.errors import JftError
from jft.models import ModelConfig


def load_adapter(path: str | os.PathLike, base: dict, model: ModelConfig, rules=None):
    """(the base the adapter applies to, [Adapter]): the delta lands on the default device,
    or sharded like its base over `rules`' mesh. The base is rewritten only for inits that
    rewrite it (PiSSA and kin: `rebase`)."""
    from jft.peft import Adapter, get_method

    method, config, delta = read_adapter(path, base, model, rules)
    impl = get_method(method)
    delta = jax.device_put(delta, delta_shardings(impl, delta, model, config, rules))
    return impl.rebase(base, delta, model, config), [Adapter(delta, method, config)]


def read_adapter(path: str | os.PathLike, base: dict, model: ModelConfig, rules=None):
    """(method, config, delta) of an adapter in any of the three formats, not yet placed."""
    from jft.formats.jft_adapter import is_jft_adapter, read_jft_adapter
    from jft.formats.peft_adapter import is_peft_adapter, read_peft_adapter
    from jft.training.checkpoints import read_run_adapter

    path = Path(path)
    check_adapter_exists(path)
    if is_peft_adapter(path):
        return read_peft_adapter(path, base, model)
    if is_jft_adapter(path):
        return read_jft_adapter(path, model)
    return read_run_adapter(path, model, rules)


def check_adapter_exists(path: str | os.PathLike, key: str = "") -> None:
    """Refuses a mistyped adapter path before a format's reader guesses at it."""
    if not Path(path).exists():
        raise JftError(f"{key + ' ' if key else ''}{path}: adapter does not exist; give a run "
                       "directory, a PEFT adapter directory or a jft adapter directory")


def read_config_object(path: Path, kind: str) -> dict:
    """An adapter's JSON config file, which must hold an object; `kind` names the format in
    the one-line error ("PEFT adapter", "jft adapter")."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise JftError(f"{path}: unreadable {kind} config ({error})") from None
    if not isinstance(config, dict):
        raise JftError(f"{path}: not a {kind} config (a JSON {type(config).__name__}, where "
                       "an object of options belongs)")
    return config


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds an adapter in one of the three formats (by its marker files)."""
    from jft.formats.jft_adapter import is_jft_adapter
    from jft.formats.peft_adapter import is_peft_adapter

    path = Path(path)
    return is_peft_adapter(path) or is_jft_adapter(path) or (path / "checkpoints").is_dir()


def delta_shardings(impl, delta, model: ModelConfig, config, rules=None):
    """Where each leaf of a (possibly abstract) delta goes: sharded like the base weight
    it changes over `rules`' mesh (the method's `delta_axes`), else the default device."""
    if rules is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, delta)
    from jft.sharding.placement import tree_shardings

    return tree_shardings(rules, delta, impl.delta_axes(delta, model, config))
