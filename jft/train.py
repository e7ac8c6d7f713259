"""`python -m jft.train CONFIG.yaml [key.sub=value ...] [--overwrite]`: fine-tune a model.

The run directory gets the resolved config, metrics.jsonl, eval_generations.jsonl,
TensorBoard events, the checkpoints and, at the end, loss_curve.png. A run whose directory
holds a checkpoint of the same config resumes from it, exactly: the deltas, optimiser
state, data position and RNG all come back. SIGTERM and SIGINT save a checkpoint before
exiting.

Console: what the run is doing (loading, compiling, resuming: one line each, with its
seconds) and the progress bar go to stderr; the metrics (the before-training evaluation,
a line per logged step where no bar is shown, the final summary) go to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from jft.errors import ConfigValueError, JftError, run_cli


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
    from jft.sharding.distributed import initialize, is_main_process
    from jft.training.config import load_config

    # Before anything touches a device: the runtime must know every host's devices.
    initialize(args.coordinator_address, args.num_processes, args.process_id)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" bars would cut status lines
    if not is_main_process():  # one copy of each warning, from process 0
        warnings.simplefilter("ignore")
    run = Run(load_config(config, overrides), overwrite=args.overwrite,
              source=config or "the command line")
    return run.train()


def fine_tune(config: str | None, overrides: Sequence[str] = (), overwrite: bool = False
              ) -> Path:
    """`python -m jft.train` from Python (notebooks): trains, and returns the run directory."""
    from jft.training.config import load_config

    run = Run(load_config(config, list(overrides)), overwrite=overwrite,
              source=config or "the overrides")
    run.train()
    return run.directory


class Run:
    """One training run, set up (model, data, adapter, optimiser, checkpoints) in order.

    The run directory is claimed (locked) first, and written only once the model, the data
    and the adapter have been set up: a run that fails on its input leaves it as it was.
    """

    def __init__(self, config, overwrite: bool = False, source: str = "config"):
        from jft.sharding import make_rules
        from jft.sharding.distributed import barrier, from_main, is_main_process
        from jft.training.run_dir import RunDirectory

        self._begin(config, make_rules(config.mesh.mesh_config()))
        self.source = source
        if is_main_process():  # one process claims the shared directory; the rest wait
            self.claim = RunDirectory(config.output_dir, config.fingerprint(), overwrite)
        try:
            resuming = self.resuming = from_main(self.claim is not None and self.claim.resuming)
            self._set_up()
            if not resuming:  # a fresh run's folder holds no other run's checkpoints
                self._commit()
            barrier("jft: run directory")
            self._open_checkpoints(resuming)
            if resuming:  # only once the checkpoint has been read
                self._commit()
        except BaseException:
            self.close()
            raise

    def _commit(self):
        if self.claim is not None:
            self.claim.commit(self.config.to_dict())
            if self._new_reference is not None:  # computed before the directory was ours
                from jft.training import reference

                reference.write_cache(self.directory, self._new_reference)

    def _set_up(self):
        import jft
        from jft.sharding.placement import bytes_per_device, total_bytes
        from jft.training.checkpoints import base_fingerprint

        config = self.config
        with self._status(f"loading model {config.model}"):
            model = jft.load(config.model, dtype=config.model_dtype,
                             compute_dtype=config.compute_dtype, rules=self.rules,
                             quantize=config.quantize, quantize_block=config.quantize_block,
                             double_quant=config.double_quant,
                             quantize_embeddings=config.quantize_embeddings,
                             loftq=self._loftq())
            if model.quantization is not None and self.is_main:
                print(f"{config.model}: {model.quantization.summary()}", file=sys.stderr)
            self.base_hash = base_fingerprint(model.params)
        self.model = model
        from jft.training.config import with_moe_settings

        self.model_config = with_moe_settings(
            model.config.replace(remat=config.remat, kernels=config.kernels), config.moe)
        with self._status("reading and tokenizing data"):
            self._read_data()
        with self._status(f"creating the {config.method.name} adapter"):
            base, adapter = self._create_adapter()
            adapter_off_is_base = self._adapter_off_is_base(base)
            self._set_up_training(base, [adapter], config.objective.build())
            # Only the state's copy of the delta lives on: LISA and HFT park the base's
            # layer weights in it, and holding the originals too would double them.
            self.model.params = None
        self._new_reference = None
        if self._precomputes_reference(adapter_off_is_base):
            self._set_up_reference()
        if self.is_main:
            held = bytes_per_device(self.base)
            print(f"mesh {dict(self.rules.mesh.shape)}: base {total_bytes(self.base) / 2**20:.1f}"
                  f" MiB, at most {max(held.values()) / 2**20:.1f} MiB on one device",
                  file=sys.stderr)

    def close(self):
        """Releases the run directory (its lock)."""
        if self.claim is not None:
            self.claim.release()
            self.claim = None

    def _adapter_off_is_base(self, base) -> bool:
        """Whether the forward without the trained adapter is the model the run started
        from: not where the method trains the base's own weights, nor where the init (or
        `objective.reference`) rewrote the base."""
        from jft.peft import get_method

        method = get_method(self.config.method.name)
        if method.edits_base_weights or self._loftq():
            return False  # LoftQ quantized W − AB, not W
        reference = getattr(self.config.objective.config, "reference", None)
        if method.rebase_keeps_function and reference is None:
            return True
        original = jax.tree.leaves(self.model.params)
        return len(original) == len(jax.tree.leaves(base)) and all(
            a is b for a, b in zip(original, jax.tree.leaves(base), strict=True))

    def _precomputes_reference(self, adapter_off_is_base: bool) -> bool:
        objective = self.config.objective
        options = objective.config
        if not objective.kind.uses_reference(options):
            return False
        if objective.kind.samples:  # new sequences every step: only the adapter-off pass
            if not adapter_off_is_base:
                raise JftError(f"{self.source}: objective {objective.name} compares with the "
                               "base without the adapter, which this method's init rewrote; "
                               "set objective.beta to 0 or method.init to the default")
            return False
        return (options.precompute_reference or options.reference is not None
                or not adapter_off_is_base)

    def _set_up_reference(self):
        """The reference log-probs of every sequence, computed now with the initial
        adapters (a fresh run; written once the directory is committed) or read from the
        run's cache (a resumed one); then batched with the data."""
        from jft.training import reference
        from jft.training.data import pad_id

        splits = {"train": self.train_tokens}
        if self.eval_tokens is not None:
            splits["eval"] = self.eval_tokens
        if self.resuming:
            values = reference.read_cache(self.directory, splits)
        else:
            with self._status("computing the reference log-probabilities"):
                adapters = self.state.adapters
                values = reference.compute(
                    lambda batch: self.steps.token_logps(self.base, adapters, batch), splits,
                    self.data_config.max_length, self.config.train.batch_size,
                    pad_id(self.model.tokenizer))
            self._new_reference = values
        self.train_tokens = reference.with_reference(self.train_tokens, values["train_first"],
                                                     values["train_second"])
        if self.eval_tokens is not None:
            self.eval_tokens = reference.with_reference(
                self.eval_tokens, values["eval_first"], values["eval_second"])
        self._make_batchers()

    def _begin(self, config, rules):
        from jft.sharding.distributed import is_main_process

        self.started = time.perf_counter()
        self.claim = None
        self._new_reference = None
        self.config = config
        self.directory = Path(config.output_dir)
        self.is_main = is_main_process()
        self.rules = rules
        self.data_config = config.data

    def _open_checkpoints(self, resuming: bool):
        """The run's checkpoints, restored from the latest one when resuming."""
        from jft.training.checkpoints import RunCheckpoints

        self.checkpoints = RunCheckpoints(self.directory / "checkpoints",
                                          self.config.checkpoint.keep)
        self.start_step = 0
        latest = self.checkpoints.latest_step()
        if resuming and latest is not None:
            checkpoint = self.directory / "checkpoints" / str(latest)
            with self._status(f"resuming from step {latest} (checkpoint {checkpoint})"):
                try:
                    self._restore()
                except BaseException:
                    self.checkpoints.close()
                    raise
        self.last_saved = self.start_step if self.start_step else None

    def _status(self, doing: str) -> contextlib.AbstractContextManager:
        return _status_line(doing) if self.is_main else contextlib.nullcontext()

    def _read_data(self):
        """The training batcher, the eval batches and the exact-match examples: each file
        read and tokenized once (calibration batches come from the same tokens)."""
        from jft.training.data import read_split

        config, tokenizer = self.config, self.model.tokenizer
        records, self.train_tokens = read_split(self.data_config, tokenizer)
        self.train_records = records if config.objective.kind.samples else None
        self.eval_tokens, self.eval_examples = None, []
        if config.data.eval and (config.eval.every or config.eval.generate):
            records, tokens = read_split(self.data_config, tokenizer, "eval")
            if config.eval.every:
                self.eval_tokens = tokens
            if config.eval.generate:
                self.eval_examples = _eval_examples(records, tokenizer, self.data_config,
                                                    config.eval)
        self._make_batchers()

    def _make_batchers(self):
        """The training batches (GRPO: its rollouts) and the eval batches."""
        from jft.training.data import batcher

        config, tokenizer = self.config, self.model.tokenizer
        if config.objective.kind.samples:
            from jft.training.rollouts import Rollouts

            self.batcher = Rollouts(self.train_records, tokenizer,
                                    config.objective.config, self.data_config,
                                    config.train.batch_size, config.train.seed,
                                    lambda: (self.model_config, self.base, self.state.adapters),
                                    lambda batch: self.steps.token_logps(
                                        self.base, self.state.adapters, batch))
        else:
            self.batcher = batcher(self.train_tokens, self.data_config, tokenizer,
                                   config.train.batch_size, config.train.seed)
        self.eval_batches = None
        if self.eval_tokens is not None:
            self.eval_batches = list(batcher(
                self.eval_tokens, self.data_config, tokenizer,
                config.eval.batch_size or config.train.batch_size, split="eval"))

    def _set_up_training(self, base, adapters, objective):
        """The optimiser of the adapters' trainable leaves, the sharded steps and their
        initial state, and the base placed on the mesh."""
        from jft.sharding.placement import put
        from jft.training.step import ShardedSteps

        self.objective = objective
        self.optimizer = self._optimizer(adapters)
        self.steps = ShardedSteps(self.model_config, self.optimizer, self.rules, base,
                                  adapters, self.config.train.seed, objective)
        self.base = put(base, self.steps.params)
        self.state = self.steps.initial_state

    def _loftq(self):
        """The LoRA config when its init is LoftQ, which runs as the base is quantized."""
        method = self.config.method
        return method.config if getattr(method.config, "init", None) == "loftq" else None

    def _create_adapter(self):
        from jft.peft import create
        from jft.training.data import batcher

        method = self.config.method
        if self._loftq() is not None:  # made by the load, beside the quantized base
            return self.model.params, self.model.adapters.pop(0)
        reference = getattr(self.config.objective.config, "reference", None)
        if reference is not None:  # the policy continues the reference adapter
            return self._reference_adapter(reference)
        calibration = None
        if method.needs_calibration:  # a separate pass, so the training order is unchanged
            batches = batcher(self.train_tokens, self.data_config, self.model.tokenizer,
                              self.config.train.batch_size, self.config.train.seed + 1)
            calibration = [next(batches) for _ in range(method.calibration_batches)]
        try:
            return create(method.name, jax.random.key(self.config.train.seed),
                          self.model.params, self.model_config, calibration, method.config)
        except ConfigValueError as error:  # e.g. targets that match none of this model's
            raise JftError(f"{self.source}: {error}") from None

    def _reference_adapter(self, path: str):
        from jft.formats.adapters import load_adapter

        base, [adapter] = load_adapter(path, self.model.params, self.model_config)
        if adapter.method != self.config.method.name:
            raise JftError(f"{self.source}: objective.reference {path} holds a "
                           f"{adapter.method} adapter, which the run continues; set "
                           f"method.name: {adapter.method}")
        return base, adapter

    @property
    def adapter(self):
        """The adapter this run trains (the last one not frozen)."""
        return [a for a in self.state.adapters if not a.frozen][-1]

    def _optimizer(self, adapters):
        from jft.peft.optim import masked_optimizer
        from jft.training.config import build_optimizer, build_schedule, wrap_accumulation

        train = self.config.train
        _check_decay_names(train.weight_decay_on, adapters)
        self.schedule = build_schedule(train)  # the optimiser's, and the logged rate's
        optimizer = masked_optimizer(build_optimizer(train, schedule=self.schedule), adapters)
        return wrap_accumulation(optimizer, train.grad_accum)

    def _restore(self):
        state, meta = self.checkpoints.restore(self.state)
        self.state = self.steps.replace(state)
        if meta.get("base") != self.base_hash:
            raise JftError(f"{self.checkpoints.directory}: the checkpoint was trained on another "
                           "base model (content hash differs); use another output_dir")
        self.batcher.restore(meta["data"])
        self.start_step = int(meta["step"])

    def save(self, step: int):
        from jft.formats.jft_adapter import architecture
        from jft.peft.factory import config_to_options

        if step == self.last_saved:  # e.g. a finished run started again
            return
        self.last_saved = step
        adapter = self.adapter
        self.checkpoints.save(step, self.state, {
            "step": step, "data": self.batcher.state(), "base": self.base_hash,
            "model": self.config.model, "method": adapter.method,
            "options": config_to_options(adapter.config),
            "architecture": architecture(self.model_config),
        })

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        """Trains to `train.steps` (or a stop signal), then releases the run directory."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> int:
        from jft.sharding.distributed import agree
        from jft.training.outputs import (
            EVAL_BEFORE_FILE,
            MetricsLog,
            Throughput,
            flops_per_token,
            write_loss_curve,
        )
        from jft.training.step import refresh_state

        config, train = self.config, self.config.train
        # Drops whatever was logged after the checkpoint being resumed (all of it when the
        # run died before its first checkpoint). Process 0 alone writes the run's files.
        log = MetricsLog(self.directory, self.start_step) if self.is_main else None
        trainable = self.adapter.impl.num_params(self.adapter.delta, self.model_config,
                                                 self.adapter.config)
        throughput = Throughput(flops_per_token(
            self.model_config, trainable, self.data_config.max_length))
        stop, stopped = _StopSignal(), False
        progress = _Progress(train.steps, quiet=not self.is_main)
        step = self.start_step
        if step == 0 and self.eval_batches is not None:  # the baseline, before any update
            with self._status("evaluating before training"):
                baseline = self._evaluate(step, log)
            if self.is_main:
                (self.directory / EVAL_BEFORE_FILE).write_text(json.dumps(baseline) + "\n")
            progress.note("before training: " + _format(baseline))
        try:
            while step < train.steps and not (stopped := agree(stop.requested)):
                compiling = step == self.start_step  # the first step compiles: not throughput
                timed = (self._status("compiling the training step") if compiling
                         else contextlib.nullcontext())
                with timed:
                    losses, tokens, metrics, logged = self._update()
                step += 1
                if step < train.steps:  # SpIEL regrows, LISA switches layers, HFT re-rounds
                    self.state = self.steps.replace(refresh_state(
                        self.model_config, self.optimizer, self.state, step, train.steps))
                if compiling:
                    throughput.restart()
                else:
                    throughput.count(tokens)
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
                              "dropped_examples": self.batcher.counters["dropped"],
                              **logged}
                    if throughput.tokens:  # none yet right after the compiling first step
                        record |= throughput.measure()
                if config.eval.every and step % config.eval.every == 0:
                    record = (record or {"step": step, "loss": float(np.mean(losses))})
                    record |= self._evaluate(step, log)
                    throughput.restart()  # evaluation time is not training throughput
                if record and log is not None:
                    log.write(record)
                progress.advance(step, record)
                if config.checkpoint.every and step % config.checkpoint.every == 0:
                    self.save(step)
            self.save(step)
        finally:
            stop.close()
            try:
                self.checkpoints.close()
            finally:
                progress.close()
                records = []
                if log is not None:
                    records = log.records()
                    log.close()
        if records:
            write_loss_curve(self.directory)
        if stopped and self.is_main:
            print(f"stopped by signal at step {step}; checkpoint saved", file=sys.stderr)
        if self.is_main:
            print(self._summary(step, records, throughput.average()), flush=True)
        return 0

    def _update(self) -> tuple[list[float], int, dict, dict[str, float]]:
        """One optimizer update over `grad_accum` micro-batches: their losses, the tokens
        trained on (padding aside), the last micro-batch's metrics, and the objective's own
        metrics (and the rollouts', for GRPO) averaged over the micro-batches."""
        losses, tokens, logged = [], 0, {}
        for _ in range(self.config.train.grad_accum):
            batch = next(self.batcher)
            self.state, metrics = self.steps.train(self.state, self.base, batch)
            losses.append(float(metrics["loss"]))
            tokens += int(np.sum(batch["segment_ids"] != 0))
            extra = {k: float(v) for k, v in metrics.items() if k not in _STEP_METRICS}
            extra |= getattr(self.batcher, "last_metrics", {})
            for key, value in extra.items():
                logged.setdefault(key, []).append(value)
        return losses, tokens, metrics, {k: float(np.mean(v)) for k, v in logged.items()}

    def _evaluate(self, step: int, log) -> dict[str, float]:
        """`evaluate`, its generations appended to eval_generations.jsonl."""
        metrics, generations = self.evaluate()
        if log is not None and generations:
            log.write_generations(step, generations)
        return metrics

    def evaluate(self) -> tuple[dict[str, float], list[dict]]:
        """Held-out loss and perplexity, and exact match when `eval.generate` is set; with
        the generation of each exact-match example (empty without `eval.generate`)."""
        total, count, sums = 0.0, 0, {}
        for batch in self.eval_batches:
            loss_sum, targets, extra = self.steps.eval(self.base, self.state.adapters, batch)
            total, count = total + float(loss_sum), count + int(targets)
            for key, value in extra.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        loss = total / max(count, 1)
        out = {"eval_loss": loss}
        if getattr(self.objective, "per_token", True):
            out["eval_perplexity"] = float(np.exp(min(loss, 50.0)))
        out |= {f"eval_{key}": value / max(count, 1) for key, value in sums.items()}
        generations = []
        if self.config.eval.generate:
            out["eval_exact_match"], generations = self._exact_match()
        return out, generations

    def _exact_match(self) -> tuple[float, list[dict]]:
        """The fraction of eval examples whose greedy completion equals the reference, and
        each example's prompt, reference, generation and whether they match."""
        from jft.inference.generation import generate_tokens
        from jft.training.data import exact_match

        tokenizer = self.model.tokenizer
        generated = generate_tokens(
            self.model_config, self.base, [example.ids for example in self.eval_examples],
            self.config.eval.max_new_tokens, sorted(set(tokenizer.stop_ids)),
            adapters=self.state.adapters,
        )
        rows = []
        for ids, example in zip(generated, self.eval_examples, strict=True):
            text = tokenizer.decode(ids)
            rows.append({"prompt": example.prompt, "reference": example.reference,
                         "generated": text, "match": exact_match(text, example.reference)})
        return sum(row["match"] for row in rows) / max(len(rows), 1), rows

    def _summary(self, step: int, records: list[dict], tokens_per_s: float | None) -> str:
        """The closing block: how far the run got, its final metrics, where its files are,
        and how to generate with the adapter."""
        from jft.training.outputs import (
            EVAL_BEFORE_FILE,
            GENERATIONS_FILE,
            LOSS_CURVE_FILE,
            METRICS_FILE,
        )

        directory = self.directory
        head = (f"done: step {step} of {self.config.train.steps} in "
                f"{_duration(time.perf_counter() - self.started)}")
        if tokens_per_s:
            head += f", {tokens_per_s:.0f} tokens/s while training"
        lines = [head]
        latest = {}
        for record in records:  # each metric's last value, eval ones from the last eval
            latest |= record
        before = _read_json(directory / EVAL_BEFORE_FILE)
        for key in ("loss", "eval_loss", "eval_exact_match", "reward", "rewards/accuracies",
                    "eval_rewards/accuracies"):
            if key in latest:
                was = f"{before[key]:.4g} before training -> " if key in before else ""
                lines.append(f"  {key:<24}{was}{latest[key]:.4g}")
        files = [("adapter", directory / "checkpoints" / str(self.last_saved)),
                 ("metrics", directory / METRICS_FILE),
                 ("loss curve", directory / LOSS_CURVE_FILE),
                 ("TensorBoard logs", directory / "tensorboard"),
                 ("eval generations", directory / GENERATIONS_FILE)]
        lines += [f"  {name:<24}{path}" for name, path in files if path.exists()]
        lines.append("generate with: " + self._generate_command())
        return "\n".join(lines)

    def _generate_command(self) -> str:
        """`python -m jft.generate` with this run's adapter, on the first eval prompt where
        the data has plain prompts."""
        prompt, chat = "...", ""
        if self.data_config.format == "prompt_completion" and self.eval_examples:
            prompt = self.eval_examples[0].prompt
        elif self.data_config.format == "chat":
            chat = " --chat"
        return (f"python -m jft.generate --model {shlex.quote(str(self.config.model))} "
                f"--adapter {shlex.quote(str(self.directory))}{chat} "
                f"--prompt {shlex.quote(prompt)}")


# What every step reports, logged under names of its own; the rest is the objective's.
_STEP_METRICS = ("loss", "grad_norm", "finite", "tokens", "pairs")


def _check_decay_names(names, adapters) -> None:
    """`train.weight_decay_on` must name leaves the adapter trains, or it decays nothing."""
    from jft.peft.base import partition

    if names is None:
        return
    present = {str(getattr(path[-1], "key", path[-1])) for adapter in partition(adapters)[0]
               for path, _ in jax.tree_util.tree_flatten_with_path(adapter.delta)[0]}
    unknown = sorted(set(names) - present)
    if unknown:
        raise ConfigValueError("train.weight_decay_on", f"{unknown[0]!r} names no trained "
                               f"leaf of the adapter; its leaves: {', '.join(sorted(present))}")


class _EvalExample(NamedTuple):
    prompt: str  # the example's prompt; for chat, its messages as the template renders them
    ids: list[int]  # what generation is fed
    reference: str


def _eval_examples(records, tokenizer, data_config, eval_config) -> list[_EvalExample]:
    """The eval examples exact match is scored on."""
    from jft.training.data import completion_reference

    examples = list(islice(records, eval_config.max_examples))
    out = []
    for example in examples:
        ids, reference = completion_reference(example, data_config.format, tokenizer)
        plain = isinstance(example.get("prompt"), str)
        prompt = example["prompt"] if plain else tokenizer.decode(ids, skip_special_tokens=False)
        out.append(_EvalExample(prompt, ids, reference))
    return out


def _shown(record: dict) -> dict:
    keys = ("loss", "eval_loss", "eval_exact_match", "tokens_per_s")
    return {k: record[k] for k in keys if k in record}


def _format(record: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in _shown(record).items())


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


@contextlib.contextmanager
def _status_line(doing: str) -> Iterator[None]:
    """`doing ... 4.2 s` on stderr: the words when the work starts, the seconds when it ends.

    Warnings raised meanwhile are held back to the end of the line, so they do not land in
    its middle; after an error the line is just ended, and the error goes below it.
    """
    print(f"{doing} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as held:
        try:
            yield
        except BaseException:
            print(file=sys.stderr, flush=True)
            raise
    print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    for warning in held:
        warnings.showwarning(warning.message, warning.category, warning.filename,
                             warning.lineno)


class _StopSignal:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop (pod slices get preempted)."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle)
                         for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True

    def close(self):
        """The handlers from before: after the loop a signal stops the process again."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _on_terminal() -> bool:
    """Whether stdout and stderr are a terminal that reports its width (tqdm draws nothing
    at zero columns, as in some containers' pseudo-terminals)."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        return False
    return os.get_terminal_size(sys.stderr.fileno()).columns > 0


class _Progress:
    """On a terminal, a tqdm bar (stderr) that advances every step, with the latest metrics
    beside it and each evaluation printed above it; otherwise one plain line per logged step
    on stdout, so a log file gets lines rather than carriage returns."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.quiet = total, quiet
        self.terminal = not quiet and _on_terminal()
        self.bar, self.latest = None, {}

    def advance(self, step: int, record: dict | None):
        if self.quiet:
            return
        if not self.terminal:
            if record:
                print(f"step {step}: {_format(record)}", flush=True)
            return
        if record and "eval_loss" in record:
            self.note(f"step {step}: {_format(record)}")
        # tqdm shows the rate itself; tokens/s would squeeze the bar off a narrow terminal.
        self.latest |= {k: v for k, v in _shown(record or {}).items() if k != "tokens_per_s"}
        postfix = {k: f"{v:.3g}" for k, v in self.latest.items()}
        if self.bar is None:  # made after the compiling first step, so its rate excludes it
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=step, unit="step", dynamic_ncols=True,
                            postfix=postfix)
            return
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.bar.n)

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
