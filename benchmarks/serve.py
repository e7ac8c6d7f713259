"""Serving many LoRA adapters (S-LoRA style): the jft engine against the base model alone
and against transformers + PEFT's mixed-adapter batches, on one workload.

    python benchmarks/serve.py --json benchmarks/results/serve_cpu.json
    python benchmarks/serve.py --quick

A load generator replays one workload on every system: Poisson arrivals at `--rate`
requests per second, prompts of random token ids (100..vocab-1) with lengths uniform in
`--prompt-len`, output lengths uniform in `--output-len`, and per request an adapter drawn
from a pool of `--pools` adapters, uniformly or by Zipf (p proportional to 1/rank, exponent
`--zipf`, the ranks assigned to the pool's adapters in a seeded random order). Arrivals,
prompts and output lengths are the same for every pool; the choices differ per pool and
distribution and are the same for every system. A pool of one has one choice, so it is
run with the uniform draw only. The adapters are random LoRAs of the bundled SmolLM2-135M
(ranks cycling 8/16/32, alpha 2r, q_proj and v_proj: PEFT's default targets; A from
`jft.peft.create`, B = 0.02 * normal), and both frameworks hold the same weights.

Systems, each driven in real time by a driver thread that sleeps until each arrival and
then submits it:

- `jft`: `jft.serve.engine.Engine` in-process (what `python -m jft.serve` runs, without
  HTTP): continuous batching of `--max-batch` rows, adapters in host memory and at most
  `--max-adapters-on-device` in the device's LoRA bank (LRU, moved on first use). As the
  server does with the adapters it is given at start-up, the first ones of the pool are put
  on the device before `compile()`; the rest are loaded when requests name them.
- `merged`: the same engine without adapters (no LoRA bank): every request on the base
  model, the ceiling of serving one merged model.
- `peft`: transformers + PEFT, one `PeftModel` holding the adapters, with a static-batching
  scheduler: whenever the model is idle it takes up to `--max-batch` arrived requests
  (FIFO), left-pads them and runs `generate(..., adapter_names=[...])` (PEFT's mixed-batch
  inference), greedy, for the batch's longest output (min_new_tokens = max_new_tokens, so
  every request gets its exact length; steps past a request's own length are wasted). A
  LogitsProcessor stamps each step, which gives every request's token times.
  `torch.set_num_threads(--threads)`, `torch.inference_mode()`.

Every engine compiles all its programs before its run (`Engine.compile`, reported apart
from the measurements: the first engine of each kind pays for the compiles, later ones hit
JAX's caches); PEFT runs one untimed batch first. Per run: throughput = generated tokens /
(last finish - first arrival); TTFT = first token - arrival; per-token latency = the gaps
between consecutive tokens of a request, pooled over the run's requests; p50 and p99. For
jft, the adapter loads and evictions during the run (`jft_adapter_loads`,
`jft_adapter_evictions`). `agreement` compares each request's greedy tokens with jft's
for the same request: the mean share of each output before its first differing token (a
check that both frameworks compute the same model).

Per pool, the merged engine runs first (its workload is the same for every pool and
distribution; it runs again beside each pool so that each ratio compares runs minutes
apart, and the spread of its runs shows the machine's noise), then per distribution jft
and peft. Each run also records how busy the process and the machine were (a shared
machine's other work shows as `machine_busy_share` above `process_cpu_share`). `--json`
is rewritten after every run. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

# Python puts this script's folder first on sys.path, where a sibling script can shadow a
# package that transformers imports (see benchmarks/vs_peft.py).
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != HERE]

MODEL = "smollm2-135m-instruct"
RANKS = (8, 16, 32)
TARGETS = ["q_proj", "v_proj"]
B_SCALE = 0.02
SYSTEMS = ("jft", "merged", "peft")
DISTRIBUTIONS = ("uniform", "zipf")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/serve.py", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests per run")
    parser.add_argument("--rate", type=float, default=3.0,
                        help="Poisson arrivals per second (the default is ~1.5x the merged "
                        "engine's capacity on a 2-core CPU, ~1.9 requests/s: under load)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 96), metavar=("LO", "HI"),
                        help="prompt tokens, uniform in [LO, HI]")
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 48),
                        metavar=("LO", "HI"), help="generated tokens, uniform in [LO, HI]")
    parser.add_argument("--pools", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--distributions", nargs="+", choices=DISTRIBUTIONS,
                        default=list(DISTRIBUTIONS))
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-adapters-on-device", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=256,
                        help="the engine's prompt plus completion bound")
    parser.add_argument("--peft-requests", type=int, default=None,
                        help="PEFT runs serve only the first N requests of the workload "
                        "(None: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 12 requests, pools 1 and 8")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


# ---------------------------------------------------------------- the workload


@dataclasses.dataclass(frozen=True)
class Workload:
    arrivals: np.ndarray  # seconds after the start, ascending
    prompts: list[list[int]]
    output_lengths: list[int]


def make_workload(args, vocab_size: int) -> Workload:
    rng = np.random.default_rng(args.seed)
    gaps = rng.exponential(1.0 / args.rate, args.requests)
    arrivals = np.cumsum(gaps) - gaps[0]  # the first request arrives at the start
    lengths = rng.integers(args.prompt_len[0], args.prompt_len[1] + 1, args.requests)
    prompts = [rng.integers(100, vocab_size, n).tolist() for n in lengths]
    outputs = rng.integers(args.output_len[0], args.output_len[1] + 1, args.requests)
    return Workload(arrivals, prompts, [int(n) for n in outputs])


def adapter_choices(args, pool: int, distribution: str) -> list[int]:
    """Each request's adapter index in 0..pool-1."""
    rng = np.random.default_rng([args.seed, pool, DISTRIBUTIONS.index(distribution)])
    if distribution == "uniform":
        return rng.integers(0, pool, args.requests).tolist()
    weights = 1.0 / np.arange(1, pool + 1) ** args.zipf
    ranks = rng.choice(pool, args.requests, p=weights / weights.sum())
    order = rng.permutation(pool)  # which adapter holds each Zipf rank
    return order[ranks].tolist()


# ---------------------------------------------------------------- measurements


@dataclasses.dataclass
class Trace:
    """One request's arrival, token times and tokens (perf_counter seconds)."""

    arrival: float = 0.0
    times: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)


def drive(workload: Workload, count: int, submit) -> threading.Thread:
    """A thread that calls submit(i, arrival time) at each request's arrival."""

    def run():
        start = time.perf_counter() + 0.05
        for i in range(count):
            delay = start + workload.arrivals[i] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            submit(i, time.perf_counter())

    thread = threading.Thread(target=run, name="driver", daemon=True)
    thread.start()
    return thread


def percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarize(traces: list[Trace]) -> dict:
    tokens = sum(len(t.times) for t in traces)
    first = min(t.arrival for t in traces)
    last = max(t.times[-1] for t in traces)
    ttft = [t.times[0] - t.arrival for t in traces]
    gaps = np.concatenate([np.diff(t.times) for t in traces])
    return {
        "requests": len(traces),
        "generated_tokens": tokens,
        "seconds": last - first,
        "throughput_tok_s": tokens / (last - first),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(gaps, 50), "tpot_p99_s": percentile(gaps, 99),
        "ttft_mean_s": float(np.mean(ttft)), "tpot_mean_s": float(np.mean(gaps)),
    }


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Mean share of each output that matches the reference up to its first difference."""
    shares = []
    for mine, theirs in zip(tokens, reference, strict=False):
        same = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b),
                    min(len(mine), len(theirs)))
        shares.append(same / max(len(theirs), 1))
    return float(np.mean(shares))


# ---------------------------------------------------------------- jft


class JftSide:
    def __init__(self, args):
        import jax

        import jft
        from jft.serve.engine import EngineSettings

        self.args = args
        self.model = jft.load(MODEL, dtype="float32")
        self.settings = EngineSettings(
            max_batch=args.max_batch, max_len=args.max_len,
            max_adapters_on_device=args.max_adapters_on_device, max_lora_rank=max(RANKS))
        self.jax = jax
        self.host: list = []  # HostAdapters, index i named a{i}
        self.compiles: list[dict] = []

    def make_adapters(self, count: int) -> None:
        from jft.peft import create
        from jft.serve.adapters import prepare

        config, params = self.model.config, self.model.params
        for i in range(len(self.host), count):
            rank = RANKS[i % len(RANKS)]
            _, adapter = create("lora", self.jax.random.key(self.args.seed * 100003 + i),
                                params, config, r=rank, alpha=2 * rank, targets=TARGETS)
            rng = np.random.default_rng([self.args.seed, i])
            delta = {"layers": {
                module: {**entry, "b": B_SCALE * rng.standard_normal(entry["b"].shape,
                                                                     np.float32)}
                for module, entry in adapter.delta["layers"].items()}}
            self.host.append(prepare(f"a{i}", Path(f"a{i}"), "lora", adapter.config, delta,
                                     params, config, self.settings.max_lora_rank))

    def run(self, workload: Workload, choices: list[int] | None,
            pool: int) -> tuple[dict, list[Trace]]:
        """One run; choices None: the merged system (no adapters)."""
        import jax.numpy as jnp

        from jft.serve.adapters import DeviceAdapters
        from jft.serve.engine import Engine, Request
        from jft.serve.metrics import Metrics

        settings, model = self.settings, self.model
        metrics = Metrics()
        device = DeviceAdapters(model.config, settings.max_adapters_on_device,
                                settings.max_lora_rank, jnp.float32, metrics)
        started = time.perf_counter()
        if choices is not None:
            device.allocate_lora_bank()
            for adapter in self.host[:min(pool, settings.max_adapters_on_device)]:
                device.ensure(adapter, set())
        preload_s = time.perf_counter() - started
        engine = Engine(model.config, model.params, model.tokenizer, device, settings, metrics)
        programs, compile_s = engine.compile()
        self.compiles.append({"system": "merged" if choices is None else "jft", "pool": pool,
                              "programs": programs, "compile_s": compile_s,
                              "preload_s": preload_s})
        counters = _counters(metrics)
        traces = [Trace() for _ in workload.prompts]
        requests = [None] * len(traces)
        finished = threading.Semaphore(0)
        errors = []

        def submit(i, now):
            trace = traces[i]

            def emit(output, trace=trace):
                if output.finish_reason is None:
                    trace.times.append(time.perf_counter())
                    return
                if output.finish_reason != "length":
                    errors.append(f"request {i}: {output.finish_reason} {output.error}")
                finished.release()

            trace.arrival = now
            adapter = None if choices is None else self.host[choices[i]]
            requests[i] = Request(workload.prompts[i], workload.output_lengths[i], emit,
                                  adapter=adapter, temperature=0.0, stop_ids=frozenset())
            engine.submit(requests[i])

        engine.start()
        try:
            driver = drive(workload, len(traces), submit)
            for _ in traces:
                finished.acquire()
            driver.join()
        finally:
            engine.stop()
        if errors:
            raise RuntimeError("; ".join(errors))
        for trace, request in zip(traces, requests, strict=True):
            trace.tokens = list(request.tokens)
        after = _counters(metrics)
        record = summarize(traces)
        record |= {
            "adapter_loads": after["jft_adapter_loads"] - counters["jft_adapter_loads"],
            "adapter_evictions": (after["jft_adapter_evictions"]
                                  - counters["jft_adapter_evictions"]),
            "preloaded_adapters": counters["jft_adapter_loads"],
            "compile_s": compile_s,
            "decode_steps": after["decode_steps"] - counters["decode_steps"],
            "decode_step_mean_s": ((after["decode_seconds"] - counters["decode_seconds"])
                                   / max(after["decode_steps"] - counters["decode_steps"], 1)),
        }
        return record, traces


def _counters(metrics) -> dict[str, float]:
    """The engine's adapter counters and decode-step histogram, now."""
    families = {m.name: m for m in metrics.registry.collect()}

    def sample(family, name):
        return sum(s.value for s in families[family].samples if s.name == name)

    return {"jft_adapter_loads": sample("jft_adapter_loads", "jft_adapter_loads_total"),
            "jft_adapter_evictions": sample("jft_adapter_evictions",
                                            "jft_adapter_evictions_total"),
            "decode_steps": sample("jft_decode_step_seconds", "jft_decode_step_seconds_count"),
            "decode_seconds": sample("jft_decode_step_seconds", "jft_decode_step_seconds_sum")}


# ---------------------------------------------------------------- transformers + PEFT


class PeftSide:
    def __init__(self, args):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from jft.formats.bundled import bundled_path

        torch.set_num_threads(args.threads)
        self.args, self.torch = args, torch
        gguf = bundled_path(MODEL)
        self.base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
        self.base.eval()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id
        self.model = None
        self.count = 0

    def add_adapters(self, host: list) -> float:
        """PEFT adapters named like jft's, holding the same factors; seconds taken.

        The first comes from `get_peft_model`; each further one is added the way PEFT's
        `add_adapter` adds it to a targeted layer, `LoraLayer.update_layer`, called on
        the q_proj and v_proj layers directly: `add_adapter` walks every module and
        parameter of the model once per adapter, which grows with the adapters already
        added (11 minutes for 512 here). update_layer itself also revisits every adapter
        the layer already holds (its re-activation and device move), so both are switched
        off while adding: the activation is done once at the end, and the move has nothing
        to do (new LoRA weights are float32 on the CPU, like the base layers).
        """
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        torch = self.torch
        started = time.perf_counter()
        configs = {rank: LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                    lora_dropout=0.0, init_lora_weights=False,
                                    inference_mode=True) for rank in RANKS}
        if self.model is None and host:
            self.model = get_peft_model(self.base, configs[host[0].rank],
                                        adapter_name=host[0].name)
            self.model.eval()
            self.count = 0
        lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        for layer in lora_layers:
            layer.set_adapter = layer._move_adapter_to_device_of_base_layer = _nothing
        try:
            for adapter in host[self.count:]:
                config = configs[adapter.rank]
                if adapter.name not in self.model.peft_config:
                    self.model.peft_config[adapter.name] = config
                    for layer in lora_layers:
                        layer.update_layer(adapter.name, adapter.rank, 2 * adapter.rank, config)
        finally:
            for layer in lora_layers:
                del layer.set_adapter, layer._move_adapter_to_device_of_base_layer
        for layer in lora_layers:
            layer.set_adapter(layer.active_adapters, inference_mode=True)
        layers = self.model.base_model.model.model.layers
        with torch.no_grad():
            for adapter in host[self.count:]:
                for module, entry in adapter.payload.items():
                    for index, block in enumerate(layers):
                        linear = getattr(block.self_attn, module)
                        scale = float(entry["scales"][index])
                        if abs(linear.scaling[adapter.name] - scale) > 1e-6:
                            raise RuntimeError(f"{adapter.name} {module}: PEFT scale "
                                               f"{linear.scaling[adapter.name]} != {scale}")
                        linear.lora_A[adapter.name].weight.copy_(
                            torch.from_numpy(np.ascontiguousarray(entry["a"][index].T)))
                        linear.lora_B[adapter.name].weight.copy_(
                            torch.from_numpy(np.ascontiguousarray(entry["b"][index].T)))
        self.count = len(host)
        return time.perf_counter() - started

    def generate(self, prompts: list[list[int]], names: list[str], new_tokens: int,
                 stamps: list[float]):
        """Greedy tokens [rows, new_tokens]; stamps gets one time per step."""
        from transformers import LogitsProcessor, LogitsProcessorList

        torch = self.torch

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, adapter_names=names,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=self.pad_id,
                temperature=None, top_p=None, top_k=None)
        return out[:, width:].tolist()

    def warm_up(self, workload: Workload) -> float:
        started = time.perf_counter()
        self.generate(workload.prompts[:2], [self.model.active_adapter] * 2, 4, [])
        return time.perf_counter() - started

    def run(self, workload: Workload, choices: list[int], count: int) -> tuple[dict, list]:
        traces = [Trace() for _ in range(count)]
        queue: deque[int] = deque()
        arrived = threading.Condition()

        def submit(i, now):
            traces[i].arrival = now
            with arrived:
                queue.append(i)
                arrived.notify()

        driver = drive(workload, count, submit)
        served, batches, wasted = 0, 0, 0
        while served < count:
            with arrived:
                while not queue:
                    arrived.wait()
                group = [queue.popleft() for _ in range(min(len(queue), self.args.max_batch))]
            lengths = [workload.output_lengths[i] for i in group]
            stamps: list[float] = []
            tokens = self.generate([workload.prompts[i] for i in group],
                                   [f"a{choices[i]}" for i in group], max(lengths), stamps)
            if len(stamps) != max(lengths):
                raise RuntimeError(f"{len(stamps)} steps stamped for {max(lengths)} tokens")
            for i, row, length in zip(group, tokens, lengths, strict=True):
                traces[i].times = stamps[:length]
                traces[i].tokens = row[:length]
            served += len(group)
            batches += 1
            wasted += sum(max(lengths) - n for n in lengths)
        driver.join()
        record = summarize(traces)
        record |= {"batches": batches, "wasted_row_steps": wasted}
        return record, traces


def _nothing(*args, **kwargs) -> None:
    return None


# ---------------------------------------------------------------- report


def environment() -> dict:
    import jax

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*command):
        try:
            return subprocess.run(["git", *command], capture_output=True, text=True,
                                  cwd=HERE.parent, check=False).stdout.strip()
        except OSError:
            return None

    commit = git("rev-parse", "HEAD")
    # Uncommitted changes to the library (jft/, models/) the run measured, if any.
    changes = (git("status", "--porcelain", "--", "jft", "models") or "").splitlines()
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "torch": version("torch"),
            "transformers": version("transformers"), "peft": version("peft"),
            "jft_commit": commit, "jft_changes": changes, "load_average": os.getloadavg()[0],
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def table(runs: list[dict]) -> str:
    head = ["pool", "distribution", "system", "requests", "tok/s", "TTFT p50 (s)",
            "TTFT p99 (s)", "per-token p50 (ms)", "per-token p99 (ms)", "jft / merged",
            "jft / peft", "loads / evictions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        ratio = {k: run.get(k) for k in ("jft_over_merged", "jft_over_peft")}
        lines.append("| " + " | ".join([
            str(run["pool"]), run["distribution"], run["system"], str(run["requests"]),
            f"{run['throughput_tok_s']:.1f}", f"{run['ttft_p50_s']:.2f}",
            f"{run['ttft_p99_s']:.2f}", f"{1e3 * run['tpot_p50_s']:.0f}",
            f"{1e3 * run['tpot_p99_s']:.0f}",
            *(f"{v:.2f}" if v is not None else "" for v in ratio.values()),
            (f"{run['adapter_loads']:.0f} / {run['adapter_evictions']:.0f}"
             if run["system"] == "jft" else "")]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.pools = 12, [p for p in args.pools if p <= 8] or [1, 8]
    for flag in ("prompt_len", "output_len"):
        low, high = getattr(args, flag)
        if not 1 <= low <= high:
            parser.error(f"--{flag.replace('_', '-')} {low} {high}: give 1 <= LO <= HI")
    if args.prompt_len[1] + args.output_len[1] > args.max_len:
        parser.error(f"--max-len {args.max_len} is below the longest prompt plus output "
                     f"({args.prompt_len[1]} + {args.output_len[1]})")
    if args.requests < 1 or args.rate <= 0 or min(args.pools) < 1:
        parser.error("--requests, --rate and --pools must be positive")
    began = time.perf_counter()
    command = "python " + " ".join([os.path.relpath(__file__, HERE.parent),
                                    *(argv if argv is not None else sys.argv[1:])])
    state = {"command": command, "began": began, "environment": environment(), "setup_s": {},
             "runs": []}

    def log(message):
        print(f"[{time.perf_counter() - began:7.1f} s] {message}", file=sys.stderr, flush=True)

    jft_side = JftSide(args)
    workload = make_workload(args, jft_side.model.config.vocab_size)
    log(f"workload: {args.requests} requests over {workload.arrivals[-1]:.1f} s, "
        f"{sum(map(len, workload.prompts))} prompt and {sum(workload.output_lengths)} output "
        "tokens")
    pools = sorted(set(args.pools))
    setup = state["setup_s"]
    started = time.perf_counter()
    jft_side.make_adapters(max(pools))
    setup["jft_adapters_s"] = time.perf_counter() - started
    peft_side = None
    if "peft" in args.systems:
        started = time.perf_counter()
        peft_side = PeftSide(args)
        setup["peft_load_s"] = time.perf_counter() - started
        setup["peft_adapters_s"] = peft_side.add_adapters(jft_side.host)
        setup["peft_warm_up_s"] = peft_side.warm_up(workload)
    log(f"set up: {json.dumps({k: round(v, 1) for k, v in setup.items()})}")
    peft_count = min(args.peft_requests or args.requests, args.requests)

    def record(pool, distribution, system, choices, run) -> tuple[dict, list[Trace]]:
        before = _cpu_snapshot()
        result, traces = run()
        result = {"pool": pool, "distribution": distribution, "system": system,
                  "distinct_adapters": (len(set(choices[:len(traces)])) if system != "merged"
                                        else 0)} | result | _cpu_usage(before)
        state["runs"].append(result)
        log(f"pool {pool} {distribution} {system}: {result['throughput_tok_s']:.1f} tok/s, "
            f"TTFT p50 {result['ttft_p50_s']:.2f} s, per-token p50 "
            f"{1e3 * result['tpot_p50_s']:.0f} ms")
        write(args, state, jft_side, workload, peft_count)
        return result, traces

    for pool in pools:
        merged = None
        if "merged" in args.systems:  # its workload is the same for every distribution
            merged, _ = record(pool, "any", "merged", [],
                               lambda pool=pool: jft_side.run(workload, None, pool))
        for distribution in args.distributions if pool > 1 else ["uniform"]:
            choices = adapter_choices(args, pool, distribution)
            jft = reference = None
            if "jft" in args.systems:
                jft, traces = record(pool, distribution, "jft", choices,
                                     lambda c=choices, p=pool: jft_side.run(workload, c, p))
                reference = [t.tokens for t in traces]
                if merged is not None:
                    jft["jft_over_merged"] = jft["throughput_tok_s"] / merged[
                        "throughput_tok_s"]
            if peft_side is not None:
                peft, traces = record(pool, distribution, "peft", choices,
                                      lambda c=choices: peft_side.run(workload, c, peft_count))
                if jft is not None:
                    peft["agreement"] = agreement([t.tokens for t in traces], reference)
                    jft["jft_over_peft"] = jft["throughput_tok_s"] / peft["throughput_tok_s"]
            write(args, state, jft_side, workload, peft_count)
    print(table(state["runs"]))
    result = write(args, state, jft_side, workload, peft_count, final=True)
    for goal, value in result["goals"].items():
        print(f"{goal}: {value['ratio']:.2f}x ({'met' if value['met'] else 'NOT met'})")
    log("done")
    return 0


def _cpu_snapshot() -> tuple:
    return time.perf_counter(), time.process_time(), _proc_stat(), os.getloadavg()[0]


def _proc_stat() -> list[int] | None:
    """The machine's CPU time counters (user nice system idle iowait irq softirq steal)."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    except (OSError, ValueError):
        return None


def _cpu_usage(before: tuple) -> dict:
    """How busy this process and the machine were during a run: a share of all CPUs; the
    machine's beyond this process's share is other work the run competed with."""
    wall, cpu, stat, load = before
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    usage = {"process_cpu_share": cpu / (wall * (os.cpu_count() or 1)),
             "load_average": [load, os.getloadavg()[0]]}
    now = _proc_stat()
    if stat is not None and now is not None:
        delta = [b - a for a, b in zip(stat, now, strict=True)]
        total = sum(delta) or 1
        usage["machine_busy_share"] = 1 - (delta[3] + delta[4]) / total
        usage["steal_share"] = delta[7] / total
    return usage


def write(args, state, jft_side, workload, peft_count, final=False) -> dict:
    goals = {}
    for run in state["runs"]:
        where = f"pool {run['pool']} {run['distribution']}"
        if run["pool"] == 64 and "jft_over_merged" in run:
            ratio = run["jft_over_merged"]
            goals[f"jft >= 0.8x merged ({where})"] = {"ratio": ratio, "met": ratio >= 0.8}
        if "jft_over_peft" in run:
            ratio = run["jft_over_peft"]
            goals[f"jft >= 2x peft ({where})"] = {"ratio": ratio, "met": ratio >= 2.0}
    result = {
        "command": state["command"],
        "date": datetime.date.today().isoformat(),
        "environment": state["environment"],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": MODEL, "dtype": "float32", "adapter_ranks": RANKS, "targets": TARGETS,
        "lora_b_scale": B_SCALE, "peft_requests": peft_count,
        "workload": {"span_s": float(workload.arrivals[-1]),
                     "prompt_tokens": sum(map(len, workload.prompts)),
                     "output_tokens": sum(workload.output_lengths),
                     "arrivals_s": [round(float(a), 4) for a in workload.arrivals],
                     "prompt_lengths": [len(p) for p in workload.prompts],
                     "output_lengths": workload.output_lengths},
        "setup_s": state["setup_s"],
        "compiles": jft_side.compiles,
        "runs": state["runs"],
        "goals": goals,
        "total_s": time.perf_counter() - state["began"],
        "finished": final,
    }
    if final:
        result["environment_at_end"] = {k: v for k, v in environment().items()
                                        if k in ("jft_commit", "jft_changes", "load_average")}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
