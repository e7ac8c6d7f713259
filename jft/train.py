"""`python -m jft.train CONFIG.yaml [key.sub=value ...] [--overwrite]`: fine-tune a model.

The run directory gets the resolved config, metrics.jsonl, TensorBoard events, the
checkpoints and, at the end, loss_curve.png. A run whose directory holds a checkpoint of
the same config resumes from it, exactly: the deltas, optimiser state, data position and
RNG all come back. SIGTERM and SIGINT save a checkpoint before exiting.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jft.errors import JftError, run_cli


def build_parser() -> argparse.ArgumentParser:
    from jft.generate import ArgumentParser

    parser = ArgumentParser(prog="python -m jft.train",
                            description="Fine-tune a model; see docs/config.md for the keys.")
    parser.add_argument("config", nargs="?", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--overwrite", action="store_true",
                        help="move an existing run in output_dir aside and start fresh")
    cluster = parser.add_argument_group(
        "multi-host", "without these, JAX detects the cluster (TPU pod slice, SLURM, Open MPI, "
        "Kubernetes) or runs as one process; see docs/pods.md")
    cluster.add_argument("--coordinator-address", metavar="HOST:PORT",
                         help="process 0's address, the same on every host")
    cluster.add_argument("--num-processes", type=int, metavar="N")
    cluster.add_argument("--process-id", type=int, metavar="I", help="0 .. N-1, one per host")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    from jft.config import load_config
    from jft.sharding.distributed import initialize, is_main_process

    # Before anything touches a device: the runtime must know every host's devices.
    initialize(args.coordinator_address, args.num_processes, args.process_id)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    if not is_main_process():  # one copy of each warning, from process 0
        warnings.simplefilter("ignore")
    run = Run(load_config(config, overrides), overwrite=args.overwrite)
    return run.train()


def fine_tune(config: str | None, overrides: Sequence[str] = (), overwrite: bool = False
              ) -> Path:
    """`python -m jft.train` from Python (notebooks): trains, and returns the run directory."""
    from jft.config import load_config

    run = Run(load_config(config, list(overrides)), overwrite=overwrite)
    run.train()
    return run.directory


class Run:
    """One training run, set up (model, data, adapter, optimiser, checkpoints) in order."""

    def __init__(self, config, overwrite: bool = False):
        import jft
        from jft.checkpointing import RunCheckpoints, base_fingerprint
        from jft.data import DataConfig, make_batcher
        from jft.run_outputs import prepare_run_dir
        from jft.sharding import make_rules
        from jft.sharding.distributed import barrier, from_main, is_main_process
        from jft.sharding.placement import bytes_per_device, put, total_bytes
        from jft.train_step import ShardedSteps

        self.config = config
        self.directory = Path(config.output_dir)
        self.is_main = is_main_process()
        self.rules = make_rules(config.mesh.mesh_config())
        resuming = False
        if self.is_main:  # one process prepares the shared directory; the rest wait for it
            resuming = prepare_run_dir(config.output_dir, config.to_dict(),
                                       config.fingerprint(), overwrite)
        barrier("jft: run directory")
        resuming = from_main(resuming)
        model = jft.load(config.model, dtype=config.model_dtype,
                         compute_dtype=config.compute_dtype, rules=self.rules)
        self.model = model
        self.model_config = model.config.replace(remat=config.remat, kernels=config.kernels)
        self.data_config = DataConfig(**dataclasses.asdict(config.data))
        train = config.train
        self.batcher = make_batcher(self.data_config, model.tokenizer, train.batch_size,
                                    train.seed)
        self.base_hash = base_fingerprint(model.params)
        base, adapter = self._create_adapter()
        self.optimizer = self._optimizer(adapter)
        self.steps = ShardedSteps(self.model_config, self.optimizer, self.rules, base,
                                  [adapter], train.seed)
        self.base = put(base, self.steps.params)
        self.state = self.steps.initial_state
        # Only the state's copy of the delta lives on: LISA and HFT park the base's layer
        # weights in it, and holding the originals too would double them.
        model.params = base = adapter = None
        if self.is_main:
            held = bytes_per_device(self.base)
            print(f"mesh {dict(self.rules.mesh.shape)}: base {total_bytes(self.base) / 2**20:.1f}"
                  f" MiB, at most {max(held.values()) / 2**20:.1f} MiB on one device",
                  file=sys.stderr)
        self.checkpoints = RunCheckpoints(self.directory / "checkpoints", config.checkpoint.keep)
        self.start_step = 0
        if resuming and self.checkpoints.latest_step() is not None:
            self._restore()
        self.last_saved = self.start_step if self.start_step else None
        self.eval_batches = None
        if config.data.eval and config.eval.every:
            self.eval_batches = list(make_batcher(
                self.data_config, model.tokenizer, config.eval.batch_size or train.batch_size,
                split="eval",
            ))
        if config.eval.generate:  # read and tokenized once, not at every evaluation
            self.eval_references = _eval_references(model.tokenizer, self.data_config,
                                                    config.eval)

    def _create_adapter(self):
        from jft.data import make_batcher
        from jft.peft import create

        method = self.config.method
        calibration = None
        if method.needs_calibration:  # a separate pass, so the training order is unchanged
            batcher = make_batcher(self.data_config, self.model.tokenizer,
                                   self.config.train.batch_size, self.config.train.seed + 1)
            calibration = [next(batcher) for _ in range(method.calibration_batches)]
        return create(method.name, jax.random.key(self.config.train.seed), self.model.params,
                      self.model_config, calibration, **method.options)

    @property
    def adapter(self):
        return self.state.adapters[0]

    def _optimizer(self, adapter):
        from jft.config import build_optimizer, wrap_accumulation
        from jft.peft.optim import masked_optimizer

        train = self.config.train
        optimizer = masked_optimizer(build_optimizer(train, train.steps), [adapter])
        return wrap_accumulation(optimizer, train.grad_accum)

    @functools.cached_property
    def schedule(self):
        from jft.config import build_schedule

        return build_schedule(self.config.train, self.config.train.steps)

    def _restore(self):
        state, meta = self.checkpoints.restore(self.state)
        self.state = self.steps.replace(state)
        if meta.get("base") != self.base_hash:
            raise JftError(f"{self.checkpoints.directory}: the checkpoint was trained on another "
                           "base model (content hash differs); use another output_dir")
        self.batcher.restore(meta["data"])
        self.start_step = int(meta["step"])

    def save(self, step: int):
        from jft.adapter_format import architecture
        from jft.peft.factory import config_to_options

        if step == self.last_saved:  # e.g. a finished run started again
            return
        self.last_saved = step
        adapter = self.state.adapters[0]
        self.checkpoints.save(step, self.state, {
            "step": step, "data": self.batcher.state(), "base": self.base_hash,
            "model": self.config.model, "method": adapter.method,
            "options": config_to_options(adapter.config),
            "architecture": architecture(self.model_config),
        })

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        from jft.run_outputs import MetricsLog, Throughput, flops_per_token, write_loss_curve
        from jft.sharding.distributed import agree
        from jft.train_step import refresh_state

        config, train = self.config, self.config.train
        # Drops whatever was logged after the checkpoint being resumed (all of it when the
        # run died before its first checkpoint). Process 0 alone writes the run's files.
        log = MetricsLog(self.directory, self.start_step) if self.is_main else None
        trainable = self.adapter.impl.num_params(self.adapter.delta, self.model_config,
                                                 self.adapter.config)
        throughput = Throughput(flops_per_token(
            self.model_config, self.config.method.name == "full", trainable,
            self.data_config.max_length))
        stop, stopped = _StopSignal(), False
        progress = _Progress(train.steps, self.start_step, quiet=not self.is_main)
        step = self.start_step
        interval_tokens = 0
        if step == 0 and self.eval_batches is not None:  # the baseline, before any update
            baseline = self.evaluate()
            if self.is_main:
                (self.directory / "eval_before.json").write_text(json.dumps(baseline) + "\n")
            progress.note("before training: " + _format(baseline))
            throughput.restart()
        try:
            while step < train.steps and not (stopped := agree(stop.requested)):
                losses, tokens = [], 0
                for _ in range(train.grad_accum):
                    batch = next(self.batcher)
                    self.state, metrics = self.steps.train(self.state, self.base, batch)
                    losses.append(float(metrics["loss"]))
                    tokens += int(np.sum(batch["segment_ids"] != 0))
                step += 1
                if step < train.steps:  # SpIEL regrows, LISA switches layers, HFT re-rounds
                    self.state = self.steps.replace(refresh_state(
                        self.model_config, self.optimizer, self.state, step, train.steps))
                interval_tokens += tokens
                if step == self.start_step + 1:  # the first step compiles: not throughput
                    throughput.restart()
                    interval_tokens = 0
                if int(self.state.bad_steps) >= train.max_bad_steps:
                    self.save(step)
                    raise JftError(
                        f"{int(self.state.bad_steps)} steps in a row had a non-finite loss or "
                        f"gradient (last loss {losses[-1]}); lower train.learning_rate or check "
                        "the data"
                    )
                record = None
                if step % train.log_every == 0 or step == train.steps:
                    record = {"step": step, "loss": float(np.mean(losses)),
                              "learning_rate": float(self.schedule(step - 1)),
                              "grad_norm": float(metrics["grad_norm"]),
                              "skipped_steps": int(self.state.skipped),
                              "truncated_examples": self.batcher.counters["truncated"],
                              "dropped_examples": self.batcher.counters["dropped"]}
                    if interval_tokens:  # none yet right after the compiling first step
                        record |= throughput.measure(interval_tokens)
                    interval_tokens = 0
                if config.eval.every and step % config.eval.every == 0:
                    record = (record or {"step": step, "loss": float(np.mean(losses))})
                    record |= self.evaluate()
                    throughput.restart()  # evaluation time is not training throughput
                if record and log is not None:
                    log.write(record)
                    progress.update(step, record)
                if config.checkpoint.every and step % config.checkpoint.every == 0:
                    self.save(step)
            self.save(step)
        finally:
            self.checkpoints.close()
            progress.close()
            records = []
            if log is not None:
                records = log.records()
                log.close()
        if records:
            write_loss_curve(records, self.directory / "loss_curve.png")
        if stopped and self.is_main:
            print(f"stopped by signal at step {step}; checkpoint saved", file=sys.stderr)
        return 0

    def evaluate(self) -> dict[str, float]:
        """Held-out loss and perplexity, and exact match when `eval.generate` is set."""
        total, count = 0.0, 0
        for batch in self.eval_batches:
            loss_sum, targets = self.steps.eval(self.base, self.state.adapters, batch)
            total, count = total + float(loss_sum), count + int(targets)
        loss = total / max(count, 1)
        out = {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0)))}
        if self.config.eval.generate:
            out["eval_exact_match"] = self._exact_match()
        return out

    def _exact_match(self) -> float:
        """The fraction of eval examples whose greedy completion equals the reference."""
        from jft.data import exact_match
        from jft.generation import generate_tokens

        tokenizer = self.model.tokenizer
        generated = generate_tokens(
            self.model_config, self.base, [ids for ids, _ in self.eval_references],
            self.config.eval.max_new_tokens, sorted(set(tokenizer.stop_ids)),
            adapters=self.state.adapters,
        )
        hits = [exact_match(tokenizer.decode(out), reference)
                for out, (_, reference) in zip(generated, self.eval_references, strict=True)]
        return sum(hits) / max(len(hits), 1)


def _eval_references(tokenizer, data_config, eval_config) -> list[tuple[list[int], str]]:
    """(prompt ids, reference text) of the eval examples exact match is scored on."""
    from jft.data import completion_reference, load_examples

    examples = list(load_examples(data_config.eval, data_config.format))
    if eval_config.max_examples:
        examples = examples[: eval_config.max_examples]
    return [completion_reference(e, data_config.format, tokenizer) for e in examples]


def _shown(record: dict) -> dict:
    keys = ("loss", "eval_loss", "eval_exact_match", "tokens_per_s")
    return {k: record[k] for k in keys if k in record}


def _format(record: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in _shown(record).items())


class _StopSignal:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop (pod slices get preempted)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


class _Progress:
    """A tqdm bar on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, quiet: bool = False):
        self.bar, self.quiet = None, quiet
        if sys.stdout.isatty() and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step")

    def update(self, step: int, record: dict):
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in _shown(record).items()})
            return
        print(f"step {step}: {_format(record)}", flush=True)

    def note(self, text: str):
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(run_cli(main))
