"""`python -m jft.serve --model M [--adapter NAME=DIR ...]`: an OpenAI-compatible server of
one base model and many adapters, batched together (docs/serving.md)."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

from jft.errors import JftError, run_cli
from jft.generate import ArgumentParser

DEFAULT_MAX_LEN = 2048
DEFAULT_LORA_RANK = 16  # vLLM's max_lora_rank default


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m jft.serve",
        description="Serve a model and its adapters through the OpenAI API, every request "
                    "with its own adapter, batched together.")
    parser.add_argument("--model", required=True,
                        help="bundled name (smollm2-135m-instruct, gemma3-270m), HF dir or .gguf")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="serve the adapter in DIR (a PEFT adapter, a jft adapter or a "
                        "jft.train run) as model NAME; repeatable; loaded at start-up")
    parser.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                        help="serve every adapter folder in DIR under its folder name, each "
                        "loaded on first use (folders added later are found too)")
    parser.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="requests decoded together (default: %(default)s)")
    parser.add_argument("--max-adapters-on-device", type=int, default=8,
                        help="adapters held on the device at once; the rest wait in host "
                        "memory (default: %(default)s)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="prompt plus completion tokens per request (default: the "
                        f"model's context length, at most {DEFAULT_MAX_LEN})")
    parser.add_argument("--max-lora-rank", type=int, default=None,
                        help="the largest LoRA rank servable (default: the largest of the "
                        f"--adapter ranks, at least {DEFAULT_LORA_RANK})")
    parser.add_argument("--served-model-name", default=None,
                        help="the base model's name in the API (default: --model as given)")
    parser.add_argument("--dtype", default="auto", help="params dtype: float32, bfloat16, or "
                        "auto, float32 on CPU and bfloat16 on GPU/TPU (default: %(default)s)")
    parser.add_argument("--kernels", default="auto", choices=["auto", "pallas", "xla"],
                        help="the decode step's multi-LoRA kernel: pallas, xla, or auto (the "
                        "kernel where benchmarks/kernels.py measured it faster) "
                        "(default: %(default)s)")
    parser.add_argument("--quantize", default="none", choices=["none", "nf4", "fp4", "int8"],
                        help="store the base's linear weights quantized, as a QLoRA run "
                        "trained on them (docs/quantization.md) (default: %(default)s)")
    parser.add_argument("--quantize-embeddings", action="store_true",
                        help="with --quantize: the embedding table too")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    return parser


def _check_args(args) -> dict[str, Path]:
    for flag in ("max_batch", "max_adapters_on_device", "max_len", "max_lora_rank"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise JftError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if not 0 <= args.port < 65536:
        raise JftError(f"--port must be in 0..65535, got {args.port}")
    adapters: dict[str, Path] = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise JftError(f"--adapter {spec!r}: give NAME=DIR")
        if name in adapters:
            raise JftError(f"--adapter {name}: named twice")
        adapters[name] = Path(path)
    for directory in args.adapter_dir:
        if not Path(directory).is_dir():
            raise JftError(f"--adapter-dir {directory}: not a directory")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
        except OSError as error:
            raise JftError(f"--host {args.host} --port {args.port}: cannot listen there "
                           f"({error.strerror})") from None
    return adapters


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    adapter_paths = _check_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("jft.serve")

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise JftError(f"python -m jft.serve needs the serve extra ({error.name} is missing): "
                       "pip install 'jft[serve]'") from None
    import jax.numpy as jnp

    import jft
    from jft.formats.adapters import is_adapter_dir, read_adapter
    from jft.serve.adapters import AdapterStore, DeviceAdapters, check_rank, prepare
    from jft.serve.app import Server, create_app
    from jft.serve.engine import Engine, EngineSettings
    from jft.serve.metrics import Metrics

    model = jft.load(args.model, dtype=args.dtype, quantize=args.quantize,
                     quantize_embeddings=args.quantize_embeddings)
    model.config = model.config.replace(kernels=args.kernels)
    config, params = model.config, model.params
    model._require_tokenizer()
    max_len = args.max_len or min(config.max_position, DEFAULT_MAX_LEN)
    if max_len > config.max_position:
        raise JftError(f"--max-len {max_len} is above the model's context length "
                       f"{config.max_position}")

    prepared = {}  # read once: their ranks set the bank's bound
    for name, path in adapter_paths.items():
        if not is_adapter_dir(path):
            raise JftError(f"--adapter {name}={path}: not an adapter directory (a PEFT "
                           "adapter, a jft adapter or a jft.train run)")
        prepared[name] = prepare(name, path, *read_adapter(path, params, config), params,
                                 config, max_rank=None)
    ranks = [a.rank for a in prepared.values() if a.is_lora]
    max_rank = args.max_lora_rank or max([DEFAULT_LORA_RANK, *ranks])
    for adapter in prepared.values():
        if adapter.is_lora:
            check_rank(adapter, max_rank)

    metrics = Metrics()
    settings = EngineSettings(max_batch=args.max_batch, max_len=max_len,
                              max_adapters_on_device=args.max_adapters_on_device,
                              max_lora_rank=max_rank)
    store = AdapterStore(config, params, max_rank, tuple(Path(d) for d in args.adapter_dir),
                         metrics)
    for name, path in adapter_paths.items():
        store.add(name, path, prepared[name])
    device = DeviceAdapters(config, settings.max_adapters_on_device, max_rank,
                            jnp.dtype(config.dtype), metrics)
    loaded = [adapter for _, _, adapter in store.names() if adapter is not None]
    if args.adapter_dir or any(a.is_lora for a in loaded):
        device.allocate_lora_bank()
    for adapter in loaded[:settings.max_adapters_on_device]:
        device.ensure(adapter, set())  # so that start-up compiles their programs too
    engine = Engine(config, params, model.tokenizer, device, settings, metrics)
    count, seconds = engine.compile()
    bank = (f"a LoRA bank of {settings.max_adapters_on_device} entries up to rank {max_rank}"
            if device.lora_bank is not None else "no LoRA bank yet")
    log.info("compiled %d programs in %.1f s (batch %d, lengths up to %d, %s)", count, seconds,
             settings.max_batch, max_len, bank)
    name = args.served_model_name or args.model
    app = create_app(Server(model, name, store, engine, max_len))
    engine.start()
    try:
        log.info("serving %s and %d adapters on http://%s:%d/v1", name, len(store.names()),
                 args.host, args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
