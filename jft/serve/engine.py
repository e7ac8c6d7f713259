"""Continuous batching: requests join and leave the running batch between decode steps.

One thread owns the device. Each turn of its loop it (1) drops cancelled requests, (2)
admits waiting requests into free slots (their adapters put on the device first) and
prefills them, a few at a time, writing their keys and values into their rows of the
cache, and (3) runs one decode step for every running row. So a new request's prefill
waits at most one decode step, never for the batch to drain, and a finished request's
slot is free for the next turn. The HTTP side hands requests in with `submit` and gets
each new piece of text through the request's `emit` callback (called on this thread).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

import jax
import numpy as np

from jft.errors import JftError
from jft.models import ModelConfig
from jft.peft.base import use_kernel
from jft.serve import batch
from jft.serve.adapters import DeviceAdapters, HostAdapter
from jft.serve.metrics import Metrics

log = logging.getLogger("jft.serve")


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """max_batch: rows decoded together; max_len: prompt plus completion tokens a
    request may hold; max_adapters_on_device: adapters resident at once; max_lora_rank:
    the LoRA bank's rank bound; prefill_rows: most new requests prefilled in one call."""

    max_batch: int = 8
    max_len: int = 2048
    max_adapters_on_device: int = 8
    max_lora_rank: int = 16
    prefill_rows: int = 4

    @property
    def cache_lengths(self) -> tuple[int, ...]:
        return batch.powers_of_two(min(128, self.max_len), self.max_len)

    @property
    def prompt_lengths(self) -> tuple[int, ...]:
        # Coarser than the cache buckets: each is a prefill program to compile.
        lengths = batch.powers_of_two(min(32, self.max_len), self.max_len)
        return tuple(n for i, n in enumerate(lengths) if i % 2 == 0 or n == self.max_len)

    @property
    def prefill_batches(self) -> tuple[int, ...]:
        return tuple(sorted({1, min(self.prefill_rows, self.max_batch)}))


@dataclasses.dataclass(frozen=True)
class Output:
    """One per generated token: the new text it completes (maybe none yet) and the count
    so far; then one with finish_reason (stop, length, or error, with `error` saying
    what went wrong)."""

    text: str
    token_count: int
    finish_reason: str | None = None
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    emit: Callable[[Output], None]
    adapter: HostAdapter | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    # Set by the engine.
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: TextStream | None = None
    cancelled: bool = False
    done: bool = False

    def __post_init__(self):
        if self.seed is None:
            self.seed = secrets.randbelow(2**31)

    @property
    def cache_tokens(self) -> int:
        """Tokens its cache row holds once its last token is fed back."""
        return len(self.prompt) + len(self.tokens)


class TextStream:
    """Incremental detokenisation with stop strings: each piece is new text that can no
    longer change (an incomplete UTF-8 character or a possible stop-string start is held
    back), and no stop string reaches the output."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int) -> tuple[str, bool]:
        """(new text, whether a stop string ended the output)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if self.stop:
            start = max(0, self.sent - self.hold)
            hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
            if hits:
                return self._take(text, max(min(hits), self.sent)), True
        safe = len(text) - self.hold
        stripped = text.rstrip("\ufffd")
        if len(stripped) < len(text):
            safe = min(safe, len(stripped))
        return self._take(text, safe), False

    def finish(self) -> str:
        """All text not yet given."""
        return self._take(self.tokenizer.decode(self.ids), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent:end], end
        return piece


class Engine:
    def __init__(self, model: ModelConfig, params, tokenizer, device: DeviceAdapters,
                 settings: EngineSettings, metrics: Metrics):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.device, self.settings, self.metrics = device, settings, metrics
        self.lora_kernel = "gathered" if use_kernel("multi_lora", model) else None
        self.slots: list[Request | None] = [None] * settings.max_batch
        self.waiting: deque[Request] = deque()
        self.cache = batch.empty_cache(model, settings.max_batch, settings.cache_lengths[0])
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the HTTP side

    def submit(self, request: Request) -> None:
        total = len(request.prompt) + request.max_tokens
        if not request.prompt or total > self.settings.max_len:
            raise JftError(f"a request needs 1 to {self.settings.max_len} tokens (max_len) "
                           f"for its prompt and completion, not {total}")
        request.text = TextStream(self.tokenizer, request.stop)
        with self._wake:
            self.waiting.append(request)
            self.metrics.waiting.set(len(self.waiting))
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Frees the request's slot at the next turn (a client that went away)."""
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="jft-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------ compile at start-up

    def compile(self) -> tuple[int, float]:
        """Runs every program once at every shape it serves: (programs, seconds)."""
        start, count = time.perf_counter(), 0
        rows = self.settings.max_batch
        # The base and LoRA bank, then one resident adapter of each rowwise signature.
        by_signature = {a.signature: a for a in self.device.resident() if not a.is_lora}
        for rowwise in [None, *by_signature.values()]:
            row_adapters = [rowwise] + [None] * (rows - 1)
            routing = self.device.routing(row_adapters)
            for length in self.settings.cache_lengths:
                cache = batch.empty_cache(self.model, rows, length)
                tokens, cache = batch.decode(self.model, self.lora_kernel, self.params, cache,
                                             np.zeros(rows, np.int32), routing,
                                             _sampling([None] * rows))
                jax.block_until_ready(tokens)
                count += 1
            for prompt in self.settings.prompt_lengths:
                for n in self.settings.prefill_batches:
                    group = ([rowwise] + [None] * (n - 1))
                    first, keys, values = batch.prefill(
                        self.model, self.params, np.zeros((n, prompt), np.int32),
                        np.ones(n, np.int32), self.device.routing(group), _sampling([None] * n))
                    jax.block_until_ready(first)
                    count += 1
                    if rowwise is not None:
                        continue
                    for length in self.settings.cache_lengths:
                        if length >= prompt:
                            cache = batch.empty_cache(self.model, rows, length)
                            jax.block_until_ready(batch.insert(
                                cache, keys, values, np.full(n, -1, np.int32),
                                np.ones(n, np.int32)))
                            count += 1
        if self.device.lora_bank is not None:  # loading an adapter: compiled up front too
            self.device.warm_up()
            count += 1
        for old in self.settings.cache_lengths:
            for new in self.settings.cache_lengths:
                if old != new:
                    jax.block_until_ready(batch.resize(
                        batch.empty_cache(self.model, rows, old), new))
                    count += 1
        return count, time.perf_counter() - start

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not any(self.slots):
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self._turn()
            except Exception as error:  # a device failure fails its requests, not the server
                log.exception("engine step failed")
                for i, request in enumerate(self.slots):
                    if request is not None:
                        self._finish(i, request, "error", error=f"{type(error).__name__}: "
                                     f"{error}")

    def _turn(self) -> None:
        for i, request in enumerate(self.slots):
            if request is not None and request.cancelled:
                self._finish(i, request, "cancelled")
        self._admit()
        running = [(i, r) for i, r in enumerate(self.slots) if r is not None]
        self.metrics.running.set(len(running))
        if not running:
            return
        self._fit_cache(max(r.cache_tokens for _, r in running))
        tokens = np.zeros(self.settings.max_batch, np.int32)
        for i, request in running:
            tokens[i] = request.tokens[-1]
        routing = self.device.routing([r.adapter if r else None for r in self.slots])
        started = time.perf_counter()
        next_tokens, self.cache = batch.decode(self.model, self.lora_kernel, self.params,
                                               self.cache, tokens, routing,
                                               _sampling(self.slots))
        next_tokens = np.asarray(next_tokens)
        self.metrics.decode_step.observe(time.perf_counter() - started)
        self.metrics.batch_occupancy.set(len(running) / self.settings.max_batch)
        for i, request in running:
            self._deliver(i, request, int(next_tokens[i]))

    def _admit(self) -> None:
        free = [i for i, r in enumerate(self.slots) if r is None]
        pinned = {r.adapter for r in self.slots if r is not None and r.adapter is not None}
        admitted, leaving = [], []
        with self._wake:  # only this thread removes from the queue; submit only appends
            candidates = list(self.waiting)
        for request in candidates:  # adapter loads outside the lock: submit never waits
            if request.cancelled:
                leaving.append(request)
                self._report(request, "cancelled")
                continue
            if len(admitted) == len(free):
                break
            if request.adapter is not None:
                if not self.device.ensure(request.adapter, pinned):
                    continue  # every device entry is in use: wait for one to free
                pinned.add(request.adapter)
            admitted.append(request)
        with self._wake:
            for request in admitted + leaving:
                self.waiting.remove(request)
            self.metrics.waiting.set(len(self.waiting))
        if not admitted:
            return
        now = time.monotonic()
        for request in admitted:
            self.metrics.queue_time.observe(now - request.arrived)
        admitted.sort(key=lambda r: len(r.prompt))
        size = self.settings.prefill_batches[-1]
        for start in range(0, len(admitted), size):
            group = admitted[start:start + size]
            self._prefill(group, free[start:start + len(group)])

    def _prefill(self, group: list[Request], slots: list[int]) -> None:
        rows = batch.bucket(len(group), self.settings.prefill_batches)
        length = batch.bucket(max(len(r.prompt) for r in group), self.settings.prompt_lengths)
        running = [r.cache_tokens for r in self.slots if r is not None]
        self._fit_cache(max([length, *running]))
        tokens = np.zeros((rows, length), np.int32)
        lengths = np.ones(rows, np.int32)
        targets = np.full(rows, -1, np.int32)
        for row, (request, slot) in enumerate(zip(group, slots, strict=True)):
            tokens[row, :len(request.prompt)] = request.prompt
            lengths[row], targets[row] = len(request.prompt), slot
        padded = group + [None] * (rows - len(group))
        first, keys, values = batch.prefill(
            self.model, self.params, tokens, lengths,
            self.device.routing([r.adapter if r else None for r in padded]), _sampling(padded))
        self.cache = batch.insert(self.cache, keys, values, targets, lengths)
        first = np.asarray(first)
        now = time.monotonic()
        for row, (request, slot) in enumerate(zip(group, slots, strict=True)):
            self.slots[slot] = request
            self.metrics.prompt_tokens.inc(len(request.prompt))
            self.metrics.time_to_first_token.observe(now - request.arrived)
            self._deliver(slot, request, int(first[row]))

    def _fit_cache(self, tokens: int) -> None:
        """Resizes the cache to the smallest length bucket holding `tokens` per row."""
        length = batch.bucket(tokens, self.settings.cache_lengths)
        if length != self.cache["k"].shape[2]:
            self.cache = batch.resize(self.cache, length)

    def _deliver(self, slot: int, request: Request, token: int) -> None:
        request.tokens.append(token)
        self.metrics.generated_tokens.inc()
        if token in request.stop_ids:
            request.emit(Output(request.text.finish(), len(request.tokens)))
            self._finish(slot, request, "stop")
            return
        text, stopped = request.text.push(token)
        if stopped:
            request.emit(Output(text, len(request.tokens)))
            self._finish(slot, request, "stop")
        elif len(request.tokens) >= request.max_tokens:
            request.emit(Output(text + request.text.finish(), len(request.tokens)))
            self._finish(slot, request, "length")
        else:  # every token, text or not: a client times tokens by these
            request.emit(Output(text, len(request.tokens)))

    def _finish(self, slot: int, request: Request, reason: str, error: str | None = None):
        self.slots[slot] = None
        self._report(request, reason, error)

    def _report(self, request: Request, reason: str, error: str | None = None) -> None:
        if request.done:
            return
        request.done = True
        self.metrics.requests.labels(reason).inc()
        if reason != "cancelled":
            request.emit(Output("", len(request.tokens), reason, error))


def _sampling(requests: list[Request | None]) -> batch.RowSampling:
    """Each row's sampling settings (empty rows: greedy)."""
    def column(get, dtype, empty):
        return np.asarray([empty if r is None else get(r) for r in requests], dtype)

    return batch.RowSampling(
        temperature=column(lambda r: r.temperature, np.float32, 0.0),
        top_p=column(lambda r: r.top_p, np.float32, 1.0),
        top_k=column(lambda r: r.top_k, np.int32, 0),
        seed=column(lambda r: r.seed, np.uint32, 0),
        step=column(lambda r: len(r.tokens), np.int32, 0),
    )
