"""The server's adapters: every one held in host memory, a few on the device (S-LoRA).

`AdapterStore` maps names to adapters. Adapters named at start-up load then (so a bad one
stops the server before it listens); those in an `--adapter-dir` load on first use, and a
folder added there later is found when a request names it. `POST /v1/adapters` and
`DELETE /v1/adapters/NAME` add and remove them while serving: a request counts as a
reference from the moment it names an adapter until its last token, and a deleted
adapter stays until its last reference is gone, so nothing in flight loses it.

`DeviceAdapters` keeps at most `slots` of them on the device, least recently used out
first, never one that a running row uses. LoRA adapters go to the fixed-shape bank of
`batch.py`; others to a rowwise bank of their signature.

An adapter is servable when its method only wraps linears (LoRA, rsLoRA, DoRA, IA3,
S²FT, SpIEL, BitFit-style biases, ...) and applies to the unmodified base: S²FT's
permuted layout is split to its indexed form, and LoRA over a PiSSA/CorDA/LoRA-GA
rewritten base is served as the rank-2r LoRA over the original base that it equals,
as PEFT converts it. Methods that edit parameters or add tokens (full fine-tuning, norm
tuning, LISA, HFT, prompt and prefix tuning) change the forward for the whole batch;
they are refused with the way to serve them (a merged model).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jft.errors import JftError
from jft.models import ModelConfig, linear_sites
from jft.peft.base import Adapter, MethodBase, get_method
from jft.serve import batch
from jft.serve.metrics import Metrics

# A method overriding any of these changes more than its own rows' linears.
# A routed feed-forward (MixLoRA) sorts the batch's tokens by expert across rows.
_BATCH_WIDE_HOOKS = ("edit_params", "edit_layer", "prompt_embeddings", "attention_prefix",
                     "feed_forward")


class UnknownAdapter(JftError):
    """No adapter of that name (HTTP 404)."""


class AdapterConflict(JftError):
    """An adapter of that name exists (HTTP 409)."""


@dataclasses.dataclass(eq=False)
class HostAdapter:
    """One adapter in host memory. payload: a LoRA bank entry (`batch.lora_host_entry`)
    for LoRA, else the delta as numpy arrays."""

    name: str
    path: Path
    method: str
    config: Any
    payload: Any
    rank: int = 0  # the LoRA bank rank it needs (0: not LoRA)
    signature: tuple | None = None  # the rowwise bank it stacks in (None: LoRA)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    refs: int = 0  # requests that named it and are not finished
    deleted: bool = False

    @property
    def is_lora(self) -> bool:
        return self.signature is None


def is_bank_lora(method: str, config) -> bool:
    return method == "lora" and not config.dora


def prepare(name: str, path: Path, method: str, config, delta, base: dict,
            model: ModelConfig, max_rank: int | None) -> HostAdapter:
    """A HostAdapter from a read adapter, or a JftError saying why it cannot be served
    (`max_rank` None: the rank is checked later, with `check_rank`)."""
    impl = get_method(method)
    where = f"adapter {name!r} ({path})"
    hooks = [h for h in _BATCH_WIDE_HOOKS
             if getattr(type(impl), h) is not getattr(MethodBase, h)]
    if hooks:
        raise JftError(f"{where}: method {method!r} changes the whole forward ({hooks[0]}), "
                       "so it cannot share a batch; serve a merged model instead "
                       "(python -m jft.export --format merged)")
    delta, config = impl.split(delta, model, config)
    delta = jax.device_get(delta)
    stacks = {site.name for site in linear_sites(model) if site.experts}
    experts = [m for m in (delta.get("layers", {}) if isinstance(delta, dict) else {})
               if m in stacks]
    if experts:
        raise JftError(f"{where}: it adapts the expert stack {experts[0]!r}, whose rows the "
                       "server's adapter banks do not route yet; serve a merged model "
                       "instead (python -m jft.export --format merged)")
    if is_bank_lora(method, config):
        entry = batch.lora_host_entry(model, Adapter(delta, method, config))
        adapter = HostAdapter(name, path, method, config, entry,
                              rank=batch.lora_entry_rank(entry))
        if max_rank is not None:
            check_rank(adapter, max_rank)
        return adapter
    if impl.rebase(base, delta, model, config) is not base:
        raise JftError(f"{where}: it applies to a rewritten base ({method} init), which "
                       "rows of other adapters do not share; serve a merged model instead")
    adapter = Adapter(delta, method, config)
    return HostAdapter(name, path, method, config, delta, signature=batch.signature(adapter))


def check_rank(adapter: HostAdapter, max_rank: int) -> None:
    if adapter.rank > max_rank:
        raise JftError(f"adapter {adapter.name!r} ({adapter.path}): LoRA rank {adapter.rank} "
                       f"is above --max-lora-rank {max_rank}; restart the server with "
                       f"--max-lora-rank {adapter.rank} or more")


class AdapterStore:
    """Named adapters in host memory (thread-safe: the HTTP handlers and the engine)."""

    def __init__(self, model: ModelConfig, base: dict, max_rank: int,
                 adapter_dirs: tuple[Path, ...] = (), metrics: Metrics | None = None):
        self.model, self.base, self.max_rank = model, base, max_rank
        self.adapter_dirs = tuple(Path(d) for d in adapter_dirs)
        self.metrics = metrics
        self._loaded: dict[str, HostAdapter] = {}
        self._lazy: dict[str, Path] = {}
        self._removed: set[str] = set()  # deleted names a folder rescan must not revive
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.rescan()

    # ------------------------------------------------------------ names

    def rescan(self) -> None:
        """Finds adapter folders in the adapter dirs (loaded on first use)."""
        from jft.formats.adapters import is_adapter_dir

        for directory in self.adapter_dirs:
            for path in sorted(directory.iterdir()) if directory.is_dir() else ():
                name = path.name
                with self._lock:
                    known = name in self._loaded or name in self._lazy or name in self._removed
                if not known and path.is_dir() and is_adapter_dir(path):
                    with self._lock:
                        self._lazy.setdefault(name, path)

    def names(self) -> list[tuple[str, Path, HostAdapter | None]]:
        """(name, folder, its HostAdapter or None while not yet loaded), by name."""
        with self._lock:
            entries = [(n, a.path, a) for n, a in self._loaded.items() if not a.deleted]
            entries += [(n, path, None) for n, path in self._lazy.items()]
        return sorted(entries, key=lambda entry: entry[0])

    def add(self, name: str, path: str | Path, prepared: HostAdapter | None = None
            ) -> HostAdapter:
        """Reads and registers an adapter; AdapterConflict if the name is taken.
        prepared: the adapter where the caller has read it already."""
        _check_name(name)
        with self._lock:
            if name in self._loaded or name in self._lazy:
                raise AdapterConflict(f"an adapter named {name!r} is already served; delete "
                                      "it first (DELETE /v1/adapters/NAME)")
        adapter = prepared or self._read(name, Path(path))
        with self._lock:
            if name in self._loaded or name in self._lazy:
                raise AdapterConflict(f"an adapter named {name!r} is already served")
            self._loaded[name] = adapter
            self._removed.discard(name)
        return adapter

    def delete(self, name: str) -> None:
        """Stops serving `name`; requests already holding it finish with it."""
        with self._lock:
            if name in self._lazy:
                del self._lazy[name]
            elif name in self._loaded:
                adapter = self._loaded.pop(name)
                adapter.deleted = True
            else:
                raise UnknownAdapter(f"no adapter named {name!r}")
            self._removed.add(name)

    # ------------------------------------------------------------ references

    def acquire(self, name: str) -> HostAdapter:
        """The adapter named `name`, loaded if need be, with one more reference."""
        adapter = self._get(name)
        if adapter is None:
            self.rescan()
            adapter = self._get(name)
        if adapter is None:
            raise UnknownAdapter(f"no adapter named {name!r}")
        with self._lock:
            adapter.refs += 1
        return adapter

    def retain(self, adapter: HostAdapter) -> None:
        """One more reference to an adapter already held."""
        with self._lock:
            adapter.refs += 1

    def release(self, adapter: HostAdapter) -> None:
        with self._lock:
            adapter.refs -= 1

    def _get(self, name: str) -> HostAdapter | None:
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            if name not in self._lazy:
                return None
            guard = self._loading.setdefault(name, threading.Lock())
        with guard:  # one thread reads it; the others wait and find it loaded
            with self._lock:
                if name in self._loaded:
                    return self._loaded[name]
                path = self._lazy.get(name)
            if path is None:  # deleted meanwhile
                return None
            adapter = self._read(name, path)
            with self._lock:
                if self._lazy.pop(name, None) is None:
                    return None
                self._loaded[name] = adapter
            return adapter

    def _read(self, name: str, path: Path) -> HostAdapter:
        from jft.formats.adapters import is_adapter_dir, read_adapter

        if not path.is_dir() or not is_adapter_dir(path):
            raise JftError(f"adapter {name!r}: {path} is not an adapter directory (a "
                           "PEFT adapter, a jft adapter or a jft.train run)")
        method, config, delta = read_adapter(path, self.base, self.model)
        adapter = prepare(name, path, method, config, delta, self.base, self.model,
                          self.max_rank)
        if self.metrics is not None:
            self.metrics.adapters_read.inc()
        return adapter


def _check_name(name: str) -> None:
    if not name or "/" in name or name.strip() != name:
        raise JftError(f"adapter name {name!r}: give a non-empty name without '/' or "
                       "surrounding spaces")


@dataclasses.dataclass
class _RowwiseBank:
    template: tuple[str, Any]
    stacked: Any
    owners: list  # the HostAdapter in each entry, or None


class DeviceAdapters:
    """At most `slots` adapters on the device, least recently used evicted first. Used by
    the engine's thread only."""

    def __init__(self, model: ModelConfig, slots: int, max_rank: int, dtype,
                 metrics: Metrics | None = None):
        self.model, self.slots, self.dtype, self.metrics = model, slots, dtype, metrics
        self.lora_shapes = batch.LoraShapes.of(model, slots, max_rank)
        self.lora_bank: dict | None = None
        self.lora_owners: list = [None] * slots
        self.rowwise: dict[tuple, _RowwiseBank] = {}
        self._resident: OrderedDict[HostAdapter, int] = OrderedDict()  # adapter -> entry

    def allocate_lora_bank(self) -> None:
        if self.lora_bank is None:
            self.lora_bank = self.lora_shapes.empty(self.model.num_layers, self.dtype)

    def warm_up(self) -> None:
        """Compiles the bank write by writing an empty entry into a free one."""
        if None in self.lora_owners:
            empty = batch.padded_lora_entry({}, self.lora_shapes, self.model.num_layers)
            self.lora_bank = batch.write_lora_slot(self.lora_bank,
                                                   self.lora_owners.index(None), empty)

    def resident(self) -> list[HostAdapter]:
        return list(self._resident)

    def ensure(self, adapter: HostAdapter, pinned: set) -> bool:
        """Puts `adapter` on the device (evicting an unpinned one if full); False when
        every resident adapter is pinned by a running row."""
        if adapter in self._resident:
            self._resident.move_to_end(adapter)
            return True
        self.drop_deleted(pinned)
        if len(self._resident) >= self.slots:
            victim = next((a for a in self._resident if a not in pinned), None)
            if victim is None:
                return False
            self._evict(victim)
            if self.metrics is not None:
                self.metrics.adapter_evictions.inc()
        if adapter.is_lora:
            self.allocate_lora_bank()
            slot = self.lora_owners.index(None)
            entry = batch.padded_lora_entry(adapter.payload, self.lora_shapes,
                                            self.model.num_layers)
            self.lora_bank = batch.write_lora_slot(self.lora_bank, slot, entry)
            self.lora_owners[slot] = adapter
        else:
            bank = self.rowwise.get(adapter.signature)
            if bank is None:
                bank = _RowwiseBank((adapter.method, adapter.config),
                                    batch.empty_rowwise_bank(adapter.payload, self.slots),
                                    [None] * self.slots)
                self.rowwise[adapter.signature] = bank
            slot = bank.owners.index(None)
            bank.stacked = batch.write_rowwise_slot(bank.stacked, slot, adapter.payload)
            bank.owners[slot] = adapter
        self._resident[adapter] = slot
        if self.metrics is not None:
            self.metrics.adapter_loads.inc()
            self.metrics.adapters_on_device.set(len(self._resident))
        return True

    def drop_deleted(self, pinned: set) -> None:
        """Frees the entries of deleted adapters no request holds any more."""
        for adapter in [a for a in self._resident if a.deleted and a not in pinned]:
            if adapter.refs <= 0:
                self._evict(adapter)

    def _evict(self, adapter: HostAdapter) -> None:
        slot = self._resident.pop(adapter)
        if adapter.is_lora:
            self.lora_owners[slot] = None
        else:
            self.rowwise[adapter.signature].owners[slot] = None
        if self.metrics is not None:
            self.metrics.adapters_on_device.set(len(self._resident))

    def routing(self, row_adapters: list[HostAdapter | None]) -> batch.Routing:
        """The device routing of a batch whose row i uses `row_adapters[i]` (None: base);
        every adapter named must be resident."""
        rows = len(row_adapters)
        lora_rows = np.full(rows, -1, np.int32)
        signatures = sorted({a.signature for a in row_adapters if a is not None and
                             not a.is_lora}, key=repr)
        rowwise_rows = np.full((len(signatures), rows), -1, np.int32)
        for i, adapter in enumerate(row_adapters):
            if adapter is None:
                continue
            if adapter.is_lora:
                lora_rows[i] = self._resident[adapter]
            else:
                rowwise_rows[signatures.index(adapter.signature), i] = self._resident[adapter]
        banks = [self.rowwise[s] for s in signatures]
        return batch.Routing(self.lora_bank, lora_rows, tuple(b.template for b in banks),
                             tuple(b.stacked for b in banks), rowwise_rows)
