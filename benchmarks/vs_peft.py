"""jft against transformers + PEFT (PyTorch): the same fine-tuning step on the same model.

    python benchmarks/vs_peft.py --shape tiny --method full lora --json results.json
    python benchmarks/vs_peft.py --shape smollm2-135m llama-1b --method full lora dora s2ft \\
        --seq 2048 --batch 4 --json results.json
    python benchmarks/vs_peft.py --shape llama-8b --method lora --seq 512 1024 2048 4096 8192 \\
        --batch 1 --json sweep.json
    python benchmarks/vs_peft.py --shape llama-8b --method lora --framework jft torch \\
        --find-max-seq --seq 4096 --batch 1 --json max_seq.json

One step is forward, backward and an AdamW update (lr 1e-4, weight decay 1e-4, betas
0.9/0.999, eps 1e-8), with the batch's own tokens as labels, on random weights:

- `jft`: `jft.training.step._train_step` jitted exactly as `benchmarks/methods.py` does
  (`measure`: the method's adapter from `jft.peft.create`, `masked_optimizer(optax.adamw)`,
  the state donated), params from `jft.models.init_params`;
- `torch` and `torch.compile`: `LlamaForCausalLM` from the `LlamaConfig` that jft's own
  exporter writes for the shape (`jft.models.llama.to_hf`), random init,
  `attn_implementation="sdpa"`, `use_cache=False`; PEFT `LoraConfig(r=16,
  lora_alpha=32, target_modules="all-linear")` (`use_dora=True` for DoRA); full FT trains
  every parameter; `torch.optim.AdamW` (its default foreach kernels) over the trainable
  parameters. `torch.compile` wraps the model (forward and backward; the optimiser stays
  eager). If compiling fails, the record says why instead of giving a time.

Methods: `full`, `lora` (r=16, alpha=32, all linears, as PEFT's "all-linear": not the
LM head), `dora` (the same with DoRA), and the jft-only `s2ft`, `spiel`, `lisa` with the
options of `benchmarks/methods.py`. Shapes are Llama architectures with random weights:
`tiny` (1.3 M params, for smoke runs), `smollm2-135m`, `llama-1b` (Llama-3.2-1B) and
`llama-8b` (Llama-3.1-8B); see `SHAPES`.

Precision (`--dtype`; `auto` is bfloat16 on a GPU and float32 on CPU, where XLA's
bfloat16 matmuls are slow): in float32 everything is float32. In bfloat16 both sides
run mixed precision the same way: frozen weights stored in bfloat16, the weights that
train kept in float32 (jft's state holds a float32 master copy; PyTorch gets a float32
model for full FT and PEFT's float32 adapters), AdamW state in float32, and matmuls in
bfloat16 (jft's compute dtype; `torch.autocast` on the PyTorch side). `--remat full`
recomputes each decoder layer in the backward pass on both sides (jft's `remat: full`,
transformers' gradient checkpointing, non-reentrant). `--jft-config FIELD=VALUE` sets
jft's runtime ModelConfig fields for its cases (e.g. `attention_impl=cudnn`); the
records say which, and the chart gives such runs bars of their own.

Every (framework, method, shape, seq) case runs in a fresh subprocess that prints one
JSON record, so that the process's peak RSS is the case's own and an out-of-memory
case becomes a record (`"error": "out of memory"`) instead of ending the run. After
`--warmup` untimed steps (default 3), `--steps` timed steps (default 10), each waited
for (`jax.block_until_ready`; `loss.item()` and `torch.cuda.synchronize()`):

- `step_time_s`: the median wall-clock step; `tokens_per_s` = batch * seq / median;
- `peak_bytes`: on a GPU the device's peak (`memory_stats()['peak_bytes_in_use']` for
  jft, `torch.cuda.max_memory_allocated()` for PyTorch, over the whole case: weights,
  state, activations); on CPU, for jft only, XLA's `memory_analysis()` of the compiled
  step (arguments + temporaries + outputs - aliased, as methods.py reports it; also in
  `xla_peak_bytes` on a GPU). `rss_peak_bytes`: the case process's peak resident set
  (`ru_maxrss`), the one figure measured the same way for both frameworks on CPU
  (`rss_baseline_bytes` is the same right after the imports, before any model exists);
- `load_average`: the machine's 1-minute load average as the case started and ended
  (on a shared machine, how much other work the timings competed with);
- `flops_per_step` and `mfu`, counted for both frameworks by `step_flops`, per token:
  forward = 2 * (matmul weights: q, k, v, o, gate, up, down of every layer, the LM head
  (tied or not) and LoRA's A and B) + causal attention, 2 * 2 * seq * heads * head_dim
  per layer (QK^T and PV) halved for causality; backward = the activation-gradient pass
  (the forward's matmul FLOPs again, and twice the forward's attention FLOPs, since both
  operands of QK^T and PV are activations whose gradients are needed) + the
  weight-gradient pass, 2 * (trainable matmul weights): all of them for full FT, A and B
  for LoRA and DoRA, the selected entries for S2FT and SpIEL, the two active layers and
  the LM head for LISA. So LoRA ~ 4N and full FT ~ 6N (N = matmul weights), plus
  attention. Not counted: norms, rotary, softmax, the loss, the optimiser, the embedding
  lookup and its gradient, DoRA's per-step weight norms, and recomputation (`--remat`,
  jft's chunked loss): model FLOPs, not hardware FLOPs. `mfu` = flops_per_step /
  step_time_s / peak: for known GPUs the dense peak of the run's dtype from NVIDIA's
  datasheets (`GPU_PEAK_FLOPS`), and on CPU a matmul peak measured in the same run (the median of
  timed 2048^3 `jnp.dot`s in the run's dtype; `torch.matmul`'s is recorded beside it).

`--find-max-seq`: for each (framework, method, shape), the longest sequence that fits,
found in subprocesses (one warm-up and one timed step each): from the first `--seq` the
length doubles until a case runs out of memory (or halves until one fits), then bisects
down to `--seq-resolution`.
That record has `max_seq` (and the step time there), `oom_seq` (the shortest that did
not fit) and every probe.

`--json` refuses an existing file unless `--overwrite`; it is rewritten after every
case, so a later failure keeps what was measured. `--deadline` bounds the whole call
(cases not started in time are recorded as not run; a running one is stopped), for
machines that allow a command only so long. Not part of the test suite. Bad flags are
one `error:` line and exit status 2. Chart: `benchmarks/plot_vs_peft.py`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
import typing
from pathlib import Path
from types import SimpleNamespace

from jft.errors import JftError, run_cli
from jft.generate import ArgumentParser
from jft.models import ModelConfig, RopeConfig
from jft.models.config import POLICY_FIELDS, RuntimePolicy
from jft.models.sites import linear_sites

# Python puts this script's folder first on sys.path, where a sibling script can shadow a
# package that transformers imports (benchmarks/kernels.py hides the `kernels` package
# of transformers' hub_kernels, and peft's import then fails), so the folder leaves
# sys.path and methods.py is loaded by its path instead.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != HERE]


def _load_methods():
    spec = importlib.util.spec_from_file_location("benchmarks_methods", HERE / "methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


methods = _load_methods()
LORA_OPTIONS, METHODS = methods.LORA_OPTIONS, methods.METHODS

FRAMEWORKS = ("jft", "torch", "torch.compile")
# jft's method name and options for each benchmark method; only the first three have a
# PEFT / plain-PyTorch counterpart.
JFT_METHODS: dict[str, tuple[str, dict]] = {
    "full": ("full", METHODS["full"]),
    "lora": ("lora", LORA_OPTIONS),
    "dora": ("lora", LORA_OPTIONS | {"dora": True}),
    "s2ft": ("s2ft", METHODS["s2ft"]),
    "spiel": ("spiel", METHODS["spiel"]),  # num_tunable_weights: LoRA's count, at run time
    "lisa": ("lisa", METHODS["lisa"]),
}
TORCH_METHODS = ("full", "lora", "dora")
LORA_RANK, LORA_ALPHA = LORA_OPTIONS["r"], LORA_OPTIONS["alpha"]
# The runtime policy fields that --jft-config may set; dtype and remat have flags of their
# own that set both frameworks alike.
RUNTIME_FIELDS = tuple(f for f in POLICY_FIELDS if f not in ("dtype", "remat"))


def _llama(vocab: int, dim: int, layers: int, heads: int, kv_heads: int, head_dim: int,
           mlp: int, tied: bool, rope: RopeConfig, max_position: int) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=vocab, embed_dim=dim, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, mlp_dim=mlp,
                       norm_eps=1e-5, rope=rope, layer_types=("full",) * layers,
                       tie_embeddings=tied, max_position=max_position)


# Llama 3.1's rope scaling (Llama-3.2-1B uses factor 32, Llama-3.1-8B factor 8).
def _llama3_rope(factor: float) -> RopeConfig:
    return RopeConfig(theta=500000.0, kind="llama3", factor=factor, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position=8192)


SHAPES: dict[str, ModelConfig] = {
    # Untied, so that the smoke runs cover the separate LM head too.
    "tiny": _llama(2048, 128, 4, 4, 2, 32, 352, False, RopeConfig(theta=10000.0), 8192),
    "smollm2-135m": _llama(49152, 576, 30, 9, 3, 64, 1536, True, RopeConfig(theta=100000.0),
                           8192),
    "llama-1b": _llama(128256, 2048, 16, 32, 8, 64, 8192, True, _llama3_rope(32.0), 131072),
    "llama-8b": _llama(128256, 4096, 32, 32, 8, 128, 14336, False, _llama3_rope(8.0), 131072),
}

# Dense (no sparsity) peak FLOP/s per dtype, from NVIDIA's datasheets: H100 SXM5 and H200
# 989 TFLOP/s bf16 tensor core and 67 TFLOP/s fp32 (no tensor cores); H100 PCIe 756 / 51;
# A100 312 / 19.5. The first name found in the device's name wins, so the PCIe entry
# comes before the plain H100 (whose SXM5 "80GB HBM3" name carries no form factor).
GPU_PEAK_FLOPS = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 51e12}),
    ("H100", {"bfloat16": 989e12, "float32": 67e12}),
    ("H200", {"bfloat16": 989e12, "float32": 67e12}),
    ("A100", {"bfloat16": 312e12, "float32": 19.5e12}),
)
CPU_MATMUL_SIZE = 2048
RECORD_PREFIX = "VS_PEFT_RECORD "
CHILD_FLAG = "--child-case"
MIB = 2**20


# ---------------------------------------------------------------- FLOPs, one rule for both


def matmul_weights_per_layer(config: ModelConfig) -> int:
    return sum(i * o for i, o in (site.sizes(config) for site in linear_sites(config)))


def lora_weights(config: ModelConfig) -> int:
    """A and B of every linear of every layer (r * (in + out) each)."""
    in_out = [site.sizes(config) for site in linear_sites(config)]
    return config.num_layers * sum(LORA_RANK * (i + o) for i, o in in_out)


def matmul_counts(method: str, config: ModelConfig, trainable_params: int | None
                  ) -> tuple[int, int]:
    """(extra matmul weights in the forward pass, trainable matmul weights) of a method.

    S2FT's and SpIEL's trainable parameters are all entries of linear weights, so their
    own count (`trainable_params`, from jft) is the trainable matmul count."""
    head = config.vocab_size * config.embed_dim
    if method == "full":
        return 0, config.num_layers * matmul_weights_per_layer(config) + head
    if method in ("lora", "dora"):
        return lora_weights(config), lora_weights(config)
    if method == "lisa":
        return 0, JFT_METHODS["lisa"][1]["activated_layers"] * matmul_weights_per_layer(
            config) + head
    if trainable_params is None:
        raise ValueError(f"{method}: the trainable count is needed to count its FLOPs")
    return 0, trainable_params


def step_flops(config: ModelConfig, method: str, batch: int, seq: int,
               trainable_params: int | None) -> int:
    """Model FLOPs of one training step (see the module docstring for what counts)."""
    extra, trainable = matmul_counts(method, config, trainable_params)
    weights = config.num_layers * matmul_weights_per_layer(config) + (
        config.vocab_size * config.embed_dim) + extra
    # QK^T and PV: 2 FLOPs per multiply-add, seq keys per query, halved for causality.
    attention = config.num_layers * 2 * 2 * seq * config.num_heads * config.head_dim // 2
    forward = 2 * weights + attention
    activation_grads = 2 * weights + 2 * attention
    weight_grads = 2 * trainable
    return batch * seq * (forward + activation_grads + weight_grads)


def gpu_peak_flops(device: str, dtype: str) -> float | None:
    for name, peaks in GPU_PEAK_FLOPS:
        if name in device:
            return peaks.get(dtype)
    return None


# ---------------------------------------------------------------- the case subprocess


def cpu_name() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"


def versions() -> dict:
    """Installed versions, read without importing (an import would add to the RSS)."""
    found = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "torch", "transformers", "peft"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return any(marker in text for marker in (
        "resource_exhausted", "out of memory", "not enough memory", "can't allocate memory",
        "bad_alloc"))


def short(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"


def run_jft(case: dict) -> dict:
    import jax

    from jft.models import init_params

    baseline = peak_rss()
    shape = SHAPES[case["shape"]]
    config = shape.replace(dtype=case["dtype"], remat=case["remat"], **case["jft_config"])
    # Jitted, so that each weight is drawn straight into its dtype: eagerly, a float32
    # copy of the largest leaf (7.5 GB on llama-8b) would set the device's peak.
    params = jax.jit(init_params, static_argnums=(0, 2))(config, jax.random.key(case["seed"]),
                                                         case["dtype"])
    batch = jax.device_put(methods.random_batch(config.vocab_size, case["batch"], case["seq"],
                                        case["seed"]))
    name, options = JFT_METHODS[case["method"]]
    options = dict(options)
    if name == "spiel":
        options["num_tunable_weights"] = methods.lora_count(params, config, case["seed"])
    settings = SimpleNamespace(seed=case["seed"], learning_rate=case["learning_rate"],
                               warmup=case["warmup"], steps=case["steps"])
    result = methods.measure(name, options, params, config, batch, settings)
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    record = {
        "trainable_params": result["trainable_params"],
        "step_time_s": result["step_time_s"],
        "step_times_s": result["step_times_s"],
        "losses": result["losses"],
        "xla_peak_bytes": result["peak_bytes"],
        "rss_baseline_bytes": baseline,
        "device": device.device_kind if device.platform != "cpu" else cpu_name(),
        "options": options,
    }
    if stats is not None:
        record |= {"peak_bytes": stats.get("peak_bytes_in_use"), "peak_bytes_source": "device"}
    else:
        record |= {"peak_bytes": result["peak_bytes"],
                   "peak_bytes_source": "xla memory_analysis of the compiled step"}
    if "error" in result:  # methods.measure keeps an out-of-memory step as a message
        record |= {"error": "out of memory", "detail": result["error"]}
    return record


def run_torch(case: dict) -> dict:
    import numpy as np
    import peft
    import torch
    import transformers

    from jft.models import llama

    baseline = peak_rss()
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    method, bf16 = case["method"], case["dtype"] == "bfloat16"
    # What trains is kept in float32, as jft's state keeps it: a float32 model for full
    # FT; for LoRA a base in the run's dtype, PEFT making its adapters float32.
    weight_dtype = torch.bfloat16 if bf16 and method != "full" else torch.float32
    hf_config = transformers.LlamaConfig(**llama.to_hf(SHAPES[case["shape"]]))
    torch.manual_seed(case["seed"])
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config, attn_implementation="sdpa", dtype=weight_dtype)
        if case["remat"] == "full":
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        options = {}
        if method in ("lora", "dora"):
            options = {"r": LORA_RANK, "lora_alpha": LORA_ALPHA,
                       "target_modules": "all-linear", "use_dora": method == "dora"}
            model = peft.get_peft_model(model, peft.LoraConfig(**options))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=case["learning_rate"], betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=1e-4)  # optax.adamw's defaults
    if case["framework"] == "torch.compile":
        model = torch.compile(model)
    tokens = methods.random_batch(hf_config.vocab_size, case["batch"], case["seq"], case["seed"])
    ids = torch.from_numpy(np.asarray(tokens["tokens"], np.int64)).to(device)

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if on_gpu:
            torch.cuda.synchronize()
        return value

    record: dict = {
        "trainable_params": sum(p.numel() for p in trainable),
        "rss_baseline_bytes": baseline,
        "options": options,
        "device": torch.cuda.get_device_name(0) if on_gpu else cpu_name(),
    }
    times, losses = [], []
    for i in range(case["warmup"] + case["steps"]):
        start = time.perf_counter()
        try:
            losses.append(step())
        except Exception as error:  # noqa: BLE001 - the record says why, the run goes on
            if is_out_of_memory(error):
                return record | {"error": "out of memory", "detail": short(error)}
            if case["framework"] == "torch.compile" and i == 0:
                return record | {"error": f"torch.compile failed: {short(error)}"}
            raise
        if i >= case["warmup"]:
            times.append(time.perf_counter() - start)
        elif i == 0:
            record["first_step_s"] = time.perf_counter() - start  # torch.compile's compile
    record |= {"step_time_s": statistics.median(times), "step_times_s": times,
               "losses": losses}
    if on_gpu:
        record |= {"peak_bytes": torch.cuda.max_memory_allocated(),
                   "peak_bytes_source": "device",
                   "reserved_peak_bytes": torch.cuda.max_memory_reserved()}
    else:
        record |= {"peak_bytes": None, "peak_bytes_source": None}
    return record


def probe_machine(dtype: str) -> dict:
    """The backend and device, and on CPU the matmul peak in `dtype` (jnp and torch)."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    found = {"backend": device.platform,
             "device": device.device_kind if device.platform != "cpu" else cpu_name()}
    if device.platform != "cpu":
        return found
    n = CPU_MATMUL_SIZE
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    found["cpu_matmul_flops"] = 2 * n**3 / _median_time(lambda: dot(a, b).block_until_ready())
    try:
        import torch

        ta = torch.randn(n, n, dtype=getattr(torch, dtype))
        tb = torch.randn(n, n, dtype=getattr(torch, dtype))
        found["torch_cpu_matmul_flops"] = 2 * n**3 / _median_time(lambda: ta @ tb)
    except ImportError:
        found["torch_cpu_matmul_flops"] = None
    return found


def _median_time(fn, warmup: int = 3, repeats: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def child_main(case_json: str) -> int:
    case = json.loads(case_json)
    if case["framework"] == "probe":
        print(RECORD_PREFIX + json.dumps(probe_machine(case["dtype"])), flush=True)
        return 0
    run = run_jft if case["framework"] == "jft" else run_torch
    # The machine's 1-minute load average before and after: on a shared machine it says
    # how much the timings were competing with other work.
    load_before = os.getloadavg()[0]
    try:
        record = run(case)
    except Exception as error:  # noqa: BLE001 - every failure becomes a record
        if not is_out_of_memory(error):
            raise
        record = {"error": "out of memory", "detail": short(error)}
    record["rss_peak_bytes"] = peak_rss()
    record["load_average"] = [load_before, os.getloadavg()[0]]
    print(RECORD_PREFIX + json.dumps(record), flush=True)
    return 0


# ---------------------------------------------------------------- the orchestrating parent


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python benchmarks/vs_peft.py",
        description="The same fine-tuning step in jft and in transformers + PEFT.",
    )
    parser.add_argument("--shape", nargs="+", required=True, choices=list(SHAPES))
    parser.add_argument("--method", nargs="+", required=True, choices=list(JFT_METHODS),
                        help="full, lora and dora run on every framework; s2ft, spiel and "
                             "lisa on jft only")
    parser.add_argument("--framework", nargs="+", default=list(FRAMEWORKS),
                        choices=FRAMEWORKS)
    parser.add_argument("--seq", nargs="+", type=int, default=[256],
                        help="sequence lengths (a sweep when several); with --find-max-seq "
                             "the first is where the search starts")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="auto: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--remat", default="none", choices=("none", "full"),
                        help="full: recompute each decoder layer in the backward pass")
    parser.add_argument("--jft-config", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="jft's runtime ModelConfig fields for its cases, e.g. "
                             f"attention_impl=cudnn; fields: {', '.join(RUNTIME_FIELDS)}")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True, help="write the records here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    parser.add_argument("--find-max-seq", action="store_true",
                        help="find the longest sequence that fits, per framework and method")
    parser.add_argument("--max-seq-limit", type=int, default=131072,
                        help="--find-max-seq stops doubling here")
    parser.add_argument("--seq-resolution", type=int, default=256,
                        help="--find-max-seq bisects down to this many tokens")
    parser.add_argument("--case-timeout", type=float, default=1800,
                        help="seconds one case may take (then recorded as a timeout)")
    parser.add_argument("--deadline", type=float,
                        help="seconds the whole call may take: later cases are not run")
    return parser


def check_args(args) -> None:
    for flag in ("batch", "steps", "seq_resolution"):
        if getattr(args, flag) < 1:
            raise JftError(f"--{flag.replace('_', '-')} must be at least 1, "
                           f"got {getattr(args, flag)}")
    if args.warmup < 0:
        raise JftError(f"--warmup must be at least 0, got {args.warmup}")
    short_seqs = [s for s in args.seq if s < 2]
    if short_seqs:
        raise JftError(f"--seq must be at least 2 (one target token), got {short_seqs[0]}")
    if args.find_max_seq and args.max_seq_limit < args.seq[0]:
        raise JftError(f"--max-seq-limit {args.max_seq_limit} is below the first --seq "
                       f"{args.seq[0]}")
    for flag in ("case_timeout", "deadline"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise JftError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.json.is_dir():
        raise JftError(f"{args.json}: is a directory; give a file path for --json")
    if args.json.exists() and not args.overwrite:
        raise JftError(f"{args.json}: already exists; pass --overwrite to replace it")
    if not any(runs_on(f, m) for f in args.framework for m in args.method):
        raise JftError(f"--method {' '.join(args.method)} has no case on --framework "
                       f"{' '.join(args.framework)}: s2ft, spiel and lisa run on jft only")


def parse_jft_config(items: list[str]) -> dict:
    """`FIELD=VALUE` pairs for jft's ModelConfig runtime fields ("none" is None), checked
    against the values the field's type allows."""
    hints = typing.get_type_hints(RuntimePolicy)
    fields = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in RUNTIME_FIELDS:
            raise JftError(f"--jft-config {item!r}: give FIELD=VALUE with FIELD one of "
                           f"{', '.join(RUNTIME_FIELDS)}")
        allowed = literal_values(hints[name])
        parsed = None if value == "none" else value
        if allowed and parsed not in allowed:
            valid = ", ".join("none" if a is None else str(a) for a in allowed)
            raise JftError(f"--jft-config {name}={value}: valid values: {valid}")
        fields[name] = parsed
    return fields


def literal_values(hint) -> tuple:
    """The values a `Literal[...] | None` type allows (empty: no Literal in it)."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if hint is type(None):
        return (None,)
    nested = [literal_values(arg) for arg in typing.get_args(hint)]
    return sum(nested, ()) if any(v for v in nested if v != (None,)) else ()


def runs_on(framework: str, method: str) -> bool:
    return framework == "jft" or method in TORCH_METHODS


class Runner:
    """Runs cases in fresh subprocesses within the call's deadline."""

    def __init__(self, args):
        self.args = args
        self.started = time.monotonic()

    def seconds_left(self) -> float:
        left = self.args.case_timeout
        if self.args.deadline is not None:
            left = min(left, self.args.deadline - (time.monotonic() - self.started))
        return left

    def run(self, case: dict) -> dict:
        """The child's record, or one that says why there is none."""
        timeout = self.seconds_left()
        if timeout < 5:
            return {"error": "not run: --deadline reached"}
        env = dict(os.environ)
        # JAX preallocates 75% of a GPU by default; PyTorch may use all of it.
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
        command = [sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, json.dumps(case)]
        start = time.monotonic()
        # A session of its own, so that a timeout also stops torch.compile's workers.
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env, start_new_session=True)
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            why = "stopped at --deadline" if timeout < self.args.case_timeout else "timeout"
            return {"error": f"{why} after {timeout:.0f} s", "case_wall_s": timeout}
        wall = time.monotonic() - start
        lines = [line for line in out.splitlines() if line.startswith(RECORD_PREFIX)]
        if lines:
            return json.loads(lines[-1][len(RECORD_PREFIX):]) | {"case_wall_s": wall}
        if child.returncode == -signal.SIGKILL:
            return {"error": "out of memory", "case_wall_s": wall,
                    "detail": "killed by SIGKILL (presumably the kernel's OOM killer)"}
        tail = " | ".join((err or out).strip().splitlines()[-3:])[-600:]
        return {"error": f"failed (exit {child.returncode}): {tail}", "case_wall_s": wall}


def case_for(args, framework: str, method: str, shape: str, seq: int, dtype: str,
             warmup: int | None = None, steps: int | None = None) -> dict:
    return {"framework": framework, "method": method, "shape": shape, "seq": seq,
            "batch": args.batch, "dtype": dtype, "remat": args.remat,
            "jft_config": args.jft_config,
            "warmup": args.warmup if warmup is None else warmup,
            "steps": args.steps if steps is None else steps,
            "learning_rate": args.learning_rate, "seed": args.seed}


def complete(case: dict, result: dict, machine: dict) -> dict:
    """The record: the case, the child's measurements, FLOPs, MFU and provenance."""
    config = SHAPES[case["shape"]]
    record = {key: case[key] for key in ("framework", "method", "shape", "seq", "batch",
                                         "dtype", "remat")}
    record |= {"jft_config": case["jft_config"]} if case["framework"] == "jft" else {}
    step_time = result.get("step_time_s") if "error" not in result else None
    trainable = result.get("trainable_params")
    flops = None
    if case["method"] not in ("s2ft", "spiel") or trainable is not None:
        flops = step_flops(config, case["method"], case["batch"], case["seq"], trainable)
    peak = machine["peak_flops"]
    record |= {
        "step_time_s": step_time,
        "tokens_per_s": case["batch"] * case["seq"] / step_time if step_time else None,
        "peak_bytes": result.get("peak_bytes"),
        "rss_peak_bytes": result.get("rss_peak_bytes"),
        "mfu": flops / step_time / peak if step_time and flops and peak else None,
        "flops_per_step": flops,
        "trainable_params": trainable,
        "device": result.get("device", machine["device"]),
        "peak_flops": peak,
        "peak_flops_source": machine["peak_flops_source"],
        "warmup": case["warmup"], "steps": case["steps"],
    }
    record |= {k: v for k, v in result.items() if k not in record}
    record |= {"versions": versions(), "jft_git": machine["jft_git"],
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    return record


def describe(record: dict) -> str:
    name = (f"{record['framework']:<13} {record['method']:<6} {record['shape']:<13} "
            f"{record['batch']}x{record['seq']}")
    if record.get("error"):
        return f"{name}  {record['error']}"
    memory = "" if record["peak_bytes"] is None else f"peak {_mib(record['peak_bytes'])} MiB, "
    mfu = "" if record["mfu"] is None else f", MFU {record['mfu']:.3f}"
    return (f"{name}  {record['step_time_s'] * 1e3:.0f} ms/step, "
            f"{record['tokens_per_s']:.0f} tok/s, {memory}RSS {_mib(record['rss_peak_bytes'])} "
            f"MiB, loss {record['losses'][0]:.3f}{mfu} ({record['case_wall_s']:.0f} s, load "
            f"{record['load_average'][0]:.1f}-{record['load_average'][1]:.1f})")


def find_max_seq(runner: Runner, args, framework: str, method: str, shape: str, dtype: str,
                 machine: dict) -> dict:
    """The longest sequence that fits: doubling (or halving) from the first --seq until
    the outcome changes, then bisecting down to --seq-resolution."""
    probes: list[dict] = []
    fits: dict[int, dict] = {}

    def probe(seq: int) -> str:
        case = case_for(args, framework, method, shape, seq, dtype, warmup=1, steps=1)
        record = complete(case, runner.run(case), machine)
        print(f"  probe {describe(record)}", flush=True)
        probes.append({"seq": seq, "error": record.get("error"),
                       "step_time_s": record["step_time_s"], "peak_bytes": record["peak_bytes"]})
        if not record.get("error"):
            fits[seq] = record
            return "fits"
        return "oom" if record["error"] == "out of memory" else "error"

    # From the first --seq: up by doubling while it fits, or down by halving while not.
    fit, oom, seq = None, None, args.seq[0]
    outcome = probe(seq)
    if outcome == "fits":
        fit = seq
        while seq * 2 <= args.max_seq_limit:
            seq *= 2
            outcome = probe(seq)
            if outcome != "fits":
                break
            fit = seq
        oom = seq if outcome == "oom" else None
    elif outcome == "oom":
        oom = seq
        while seq // 2 >= max(2, args.seq_resolution):
            seq //= 2
            outcome = probe(seq)
            if outcome != "oom":
                break
            oom = seq
        fit = seq if outcome == "fits" else None
    # Then bisect between the longest that fits and the shortest that does not.
    while outcome != "error" and fit is not None and oom is not None:
        middle = (fit + oom) // 2 // args.seq_resolution * args.seq_resolution
        if middle <= fit:
            break
        outcome = probe(middle)
        if outcome == "fits":
            fit = middle
        elif outcome == "oom":
            oom = middle
    if fit is not None:
        record = dict(fits[fit])
    else:  # nothing fitted: the record of the first probe's case, without numbers
        first = case_for(args, framework, method, shape, args.seq[0], dtype, warmup=1, steps=1)
        record = complete(first, {"error": probes[0]["error"]}, machine)
    record |= {"search": "max_seq", "max_seq": fit, "oom_seq": oom, "probes": probes}
    if fit is not None and outcome == "error":
        record["note"] = f"search stopped by an error: {probes[-1]['error']}"
    elif fit is not None and oom is None:
        record["note"] = f"fits up to --max-seq-limit {args.max_seq_limit}"
    return record


def print_table(records: list[dict]) -> None:
    """Step time and memory per case, then jft's ratios to each PyTorch framework."""
    print(f"\n{'shape':<13} {'seq':>5} {'method':<6} {'framework':<13} {'ms/step':>9} "
          f"{'tok/s':>8} {'MFU':>6} {'peak MiB':>9} {'RSS MiB':>8}")
    for r in records:
        head = f"{r['shape']:<13} {r['seq']:>5} {r['method']:<6} {r['framework']:<13}"
        if r.get("error"):
            print(f"{head} {r['error']}")
            continue
        print(f"{head} {r['step_time_s'] * 1e3:>9.1f} {r['tokens_per_s']:>8.0f} "
              f"{_number(r['mfu'], '.3f'):>6} {_mib(r['peak_bytes']):>9} "
              f"{_mib(r['rss_peak_bytes']):>8}")
    timed = {(r["shape"], r["seq"], r["method"], r["framework"]): r for r in records
             if not r.get("error")}
    lines = []
    for (shape, seq, method, framework), r in timed.items():
        for other in FRAMEWORKS[1:] if framework == "jft" else ():
            o = timed.get((shape, seq, method, other))
            if o is not None:
                lines.append(f"  {shape} {seq} {method}: jft / {other}: time "
                             f"x{_ratio(r['step_time_s'], o['step_time_s'])}, peak RSS "
                             f"x{_ratio(r['rss_peak_bytes'], o['rss_peak_bytes'])}, device peak "
                             f"x{_ratio(r['peak_bytes'], o['peak_bytes'])}")
    if lines:
        print("\n" + "\n".join(lines))


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def _ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def probe_machine_in_child(runner: Runner, dtype_flag: str) -> tuple[str, dict]:
    """The run's dtype, and the machine: probed in a child, because the parent would hold
    the accelerator for the whole run if it touched it."""
    found = runner.run({"framework": "probe", "dtype": "float32"})
    if "error" in found:
        raise JftError(f"could not probe the machine: {found['error']}")
    on_gpu = found["backend"] == "gpu"
    dtype = ("bfloat16" if on_gpu else "float32") if dtype_flag == "auto" else dtype_flag
    if on_gpu:
        peak = gpu_peak_flops(found["device"], dtype)
        source = "NVIDIA datasheet, dense (GPU_PEAK_FLOPS)" if peak else "unknown GPU"
    else:
        if dtype != "float32":
            found = runner.run({"framework": "probe", "dtype": dtype})
        peak = found["cpu_matmul_flops"]
        source = (f"measured: median {CPU_MATMUL_SIZE}^3 jnp.dot in {dtype} on this CPU "
                  f"(torch.matmul: {found['torch_cpu_matmul_flops'] / 1e9:.1f} GFLOP/s)")
    return dtype, {"backend": found["backend"], "device": found["device"], "peak_flops": peak,
                   "peak_flops_source": source, "jft_git": git_describe()}


def git_describe() -> str | None:
    """The checkout's commit, `-dirty` when the working tree has changes."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def main(argv: list[str]) -> int:
    if argv[:1] == [CHILD_FLAG]:
        return child_main(argv[1])
    args = build_parser().parse_args(argv)
    check_args(args)
    args.jft_config = parse_jft_config(args.jft_config)
    runner = Runner(args)
    dtype, machine = probe_machine_in_child(runner, args.dtype)
    print(f"{machine['device']} ({machine['backend']}), {dtype}, batch {args.batch}, "
          f"remat {args.remat}; peak {_number(machine['peak_flops'], '.3g')} FLOP/s "
          f"({machine['peak_flops_source']}); {args.warmup} warm-up + {args.steps} timed "
          "steps per case", flush=True)

    records: list[dict] = []
    for shape in args.shape:
        for method in args.method:
            for framework in (f for f in args.framework if runs_on(f, method)):
                if args.find_max_seq:
                    print(f"{framework} {method} {shape}: finding the longest sequence ...",
                          flush=True)
                    record = find_max_seq(runner, args, framework, method, shape, dtype,
                                          machine)
                    print(f"  longest that fits: {record['max_seq']} (first out of memory: "
                          f"{record['oom_seq']})", flush=True)
                    records.append(record)
                    methods.write_json(args.json, records)
                    continue
                for seq in args.seq:
                    case = case_for(args, framework, method, shape, seq, dtype)
                    record = complete(case, runner.run(case), machine)
                    print(describe(record), flush=True)
                    records.append(record)
                    methods.write_json(args.json, records)
    if not args.find_max_seq:
        print_table(records)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
