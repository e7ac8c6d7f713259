"""Run checkpoints with Orbax: deltas, optimiser state, data position, RNG and step.

The frozen base is never copied: the run records the model by path and a content hash
of its params (`base_fingerprint`), and a checkpoint only restores over the same base.
The train state is saved as a flat {key path: array} dict, so restoring needs only a
template state of the same structure (a freshly initialised one), whatever pytree node
types the optimiser uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jft.errors import JftError
from jft.storage import check_free_space, is_out_of_space, out_of_space, remove
from jft.training.step import TrainState


class RunCheckpoints:
    """The `checkpoints/` folder of a run: save every N steps (async), keep the last K.

    A full disk ends the run with one line naming the checkpoint that did not fit; its
    half-written folder is removed and the earlier checkpoints are kept.
    """

    def __init__(self, directory: str | os.PathLike, keep: int):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True),
        )
        self.writing: tuple[int, int] | None = None  # (step, bytes) of the save in flight
        self.failed = False
        # Orbax logs a failed background save at ERROR from several threads, with
        # tracebacks (hundreds of lines for one full disk); it is raised here anyway.
        self.quiet = _DiskFullLogs()
        logging.getLogger("absl").addFilter(self.quiet)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: dict[str, Any]):
        """Starts an asynchronous save. `meta` (JSON) holds the data position, the method
        and its options. The adapter is saved once, inside the state: `load_adapter`
        restores just its leaves from there."""
        flat = _flatten(state)
        needed = max(sum(leaf.nbytes for leaf in flat.values()), self._last_size())
        with self._disk_errors():  # also the previous save's, which surface here
            self.writing = (step, needed)
            check_free_space(self.directory / str(step), needed)
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)))

    def restore(self, template: TrainState, step: int | None = None
                ) -> tuple[TrainState, dict[str, Any]]:
        step = self.latest_step() if step is None else step
        flat = _flatten(template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, flat)
        with _unreadable_checkpoint(self.directory / str(step)):
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore(),
            ))
        return _unflatten(template, restored.state), dict(restored.meta)

    def wait(self):
        with self._disk_errors():
            self.manager.wait_until_finished()

    def close(self):
        try:
            if self.failed:  # reported already; what is left to close fails the same way
                with contextlib.suppress(Exception):
                    self.manager.close()
                return
            with self._disk_errors():
                self.manager.wait_until_finished()
                self.manager.close()
        finally:
            logging.getLogger("absl").removeFilter(self.quiet)

    def _last_size(self) -> int:
        """The disk space the latest finished checkpoint takes (its arrays, Orbax's metadata
        and the filesystem's blocks): about what the next one needs."""
        step = self.latest_step()
        if step is None:
            return 0
        return sum(path.stat().st_blocks * 512
                   for path in (self.directory / str(step)).rglob("*") if path.is_file())

    @contextlib.contextmanager
    def _disk_errors(self) -> Iterator[None]:
        """A full disk, here or in the background save, as one line; the half-written
        checkpoint removed."""
        try:
            yield
        except Exception as error:
            if not is_out_of_space(error):
                raise
            self.failed = True
            step, needed = self.writing or (None, None)
            for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
                remove(partial)
            target = self.directory / str(step) if step is not None else self.directory
            raise out_of_space(target, needed) from None


class _DiskFullLogs(logging.Filter):
    """Drops log records about a full disk."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (is_out_of_space(error) or is_out_of_space(Exception(record.getMessage())))


@contextlib.contextmanager
def _unreadable_checkpoint(checkpoint: Path) -> Iterator[None]:
    """A checkpoint Orbax cannot read as one line: another model's or method's (its
    structure differs), or damaged data (TensorStore's errors, e.g. DATA_LOSS)."""
    _quiet_closed_event_loops()  # before the read: its callbacks can fire while it fails
    try:
        yield
    except (ValueError, KeyError, FileNotFoundError) as error:
        if not _is_data_error(error):
            raise JftError(f"{checkpoint}: checkpoint does not match this run's model and "
                           f"method ({type(error).__name__}: {_first_line(error)})") from None
        raise _damaged(checkpoint, error) from None
    except Exception as error:  # TensorStore read failures arrive as a bare Exception
        raise _damaged(checkpoint, error) from None


def _is_data_error(error: BaseException) -> bool:
    text = str(error)
    return any(code in text for code in ("DATA_LOSS", "OUT_OF_RANGE", "zarr", "OCDBT",
                                         "Error reading", "Error opening"))


def _damaged(checkpoint: Path, error: BaseException) -> JftError:
    cause = error.__cause__ or error
    earlier = sorted(int(p.name) for p in checkpoint.parent.iterdir()
                     if p.name.isdigit() and int(p.name) < int(checkpoint.name))
    hint = (f"delete it to resume from checkpoint {earlier[-1]}" if earlier else
            "delete it (no earlier checkpoint is left) or choose another output_dir")
    return JftError(f"{checkpoint}: checkpoint data is damaged and cannot be read "
                    f"({_first_line(cause)}); {hint}")


def _quiet_closed_event_loops() -> None:
    """After a failed read, TensorStore's pending callbacks still post to the event loop
    Orbax has closed, and Python prints each "Event loop is closed" error with its traceback
    (dozens, interleaved with the one-line error): noise about an error already reported."""
    if sys.unraisablehook is not _drop_closed_loop_errors:
        _drop_closed_loop_errors.previous = sys.unraisablehook
        sys.unraisablehook = _drop_closed_loop_errors


def _drop_closed_loop_errors(unraisable) -> None:
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        _drop_closed_loop_errors.previous(unraisable)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def read_run_adapter(run_dir: str | os.PathLike, model, rules=None):
    """(method, config, delta) of a run's latest checkpoint (or of `RUN/checkpoints/N`
    itself), in the form that applies to an unmodified base where the method has one
    (`split`: S2FT's indexed form). The delta is restored straight onto its place (sharded
    like its base over `rules`' mesh, whatever mesh the run trained on); only its leaves
    of the train state are read. `jft.formats.adapters.load_adapter` applies it."""
    from jft.formats.adapters import delta_shardings
    from jft.formats.jft_adapter import check_architecture
    from jft.peft import get_method, make_config

    run_dir, step = Path(run_dir).absolute(), None
    if not run_dir.exists():
        raise JftError(f"{run_dir}: adapter does not exist; give a jft run directory, a PEFT "
                       "adapter directory or a jft adapter directory")
    if run_dir.parent.name == "checkpoints" and run_dir.name.isdigit():  # one checkpoint
        run_dir, step = run_dir.parents[1], int(run_dir.name)
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise JftError(f"{run_dir}: not an adapter: no checkpoints/ folder (a jft run), "
                       "adapter_config.json (PEFT) or jft_adapter.json (jft)")
    manager = ocp.CheckpointManager(directory, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(), "adapter": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler()})
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise JftError(f"{directory}: holds no finished checkpoint")
    elif step not in manager.all_steps():
        raise JftError(f"{directory}/{step}: not a finished checkpoint; finished: "
                       f"{sorted(manager.all_steps())}")
    with _unreadable_checkpoint(directory / str(step)):
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if "architecture" in meta:  # runs saved before it was recorded go unchecked
        check_architecture(meta["architecture"], model, directory / str(step))
    config = make_config(meta["method"], meta["options"])
    impl = get_method(meta["method"])
    # Shapes only: the mesh the run trained on need not exist here.
    with _unreadable_checkpoint(directory / str(step)):
        stored = manager.item_metadata(step)
    separate = "adapter" in stored.keys()  # runs saved before the state held the only copy
    if separate:
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                stored.adapter.tree)
    else:
        abstract = _stored_delta({k: jax.ShapeDtypeStruct(m.shape, m.dtype)
                                  for k, m in stored.state.items()})
    shardings = delta_shardings(impl, abstract, model, config, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    with _unreadable_checkpoint(directory / str(step)):
        if separate:
            delta = manager.restore(step, args=ocp.args.Composite(
                adapter=ocp.args.StandardRestore(target))).adapter
        else:  # only the delta's leaves of the state: not the optimiser moments
            flat = _delta_paths(target)
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=flat, restore_args=jax.tree.map(
                    lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), flat),
                    partial_restore=True))).state
            delta = jax.tree.map(lambda path: restored[path],
                                 _delta_paths(abstract, as_path=True))
    manager.close()
    delta, config = impl.split(delta, model, config)
    return meta["method"], config, delta


# The first adapter's delta inside a flattened TrainState: `_flatten`'s key paths start so.
_DELTA_PREFIX = ".adapters[0].delta"
_KEY = re.compile(r"\['([^']*)'\]")


def _stored_delta(flat: dict[str, Any]) -> dict:
    """The nested delta tree of a flattened state's first adapter."""
    delta: dict = {}
    for path, leaf in flat.items():
        if not path.startswith(_DELTA_PREFIX):
            continue
        *parents, name = _KEY.findall(path[len(_DELTA_PREFIX):])
        node = delta
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = leaf
    return delta


def _delta_paths(delta, as_path: bool = False):
    """{flattened-state key path: leaf} of a delta tree, or (`as_path`) the tree of paths."""
    def path_of(path, _):
        return _DELTA_PREFIX + jax.tree_util.keystr(path)

    paths = jax.tree_util.tree_map_with_path(path_of, delta)
    if as_path:
        return paths
    return {p: leaf for p, leaf in zip(jax.tree.leaves(paths), jax.tree.leaves(delta),
                                       strict=True)}


def _flatten(state: TrainState) -> dict[str, jax.Array]:
    leaves = jax.tree_util.tree_flatten_with_path(_with_key_data(state))[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _unflatten(template: TrainState, flat: dict[str, jax.Array]) -> TrainState:
    plain = _with_key_data(template)
    paths, treedef = jax.tree_util.tree_flatten_with_path(plain)
    missing = [jax.tree_util.keystr(p) for p, _ in paths if jax.tree_util.keystr(p) not in flat]
    if missing:
        raise JftError(f"checkpoint lacks {missing[0]}: it belongs to another model or method")
    leaves = []
    for path, like in paths:
        value = flat[jax.tree_util.keystr(path)]
        if value.shape != like.shape:
            raise JftError(f"checkpoint tensor {jax.tree_util.keystr(path)} has shape "
                           f"{value.shape}, this run expects {like.shape}")
        leaves.append(value)
    restored = jax.tree_util.tree_unflatten(treedef, leaves)
    return TrainState(**{**restored.__dict__, "rng": jax.random.wrap_key_data(restored.rng)})


def _with_key_data(state: TrainState) -> TrainState:
    """The state with its typed PRNG key as raw uint32 data, which Orbax can store."""
    rng = state.rng
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return TrainState(**{**state.__dict__, "rng": rng})


def base_fingerprint(params) -> str:
    """A content hash of the frozen base: shapes, dtypes and a strided sample of values
    (hashing every byte of a large model on each start would cost minutes)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        sample = jax.numpy.ravel(leaf)[:: max(1, leaf.size // 4096)]
        sample = multihost_utils.process_allgather(sample, tiled=True)  # sharded over hosts
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(str((leaf.shape, str(leaf.dtype))).encode())
        digest.update(np.ascontiguousarray(sample.astype(np.float32)).tobytes())
    return digest.hexdigest()[:16]
