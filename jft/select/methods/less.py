"""`less`: the examples whose gradients point where the target's do (Xia et al., ICML
2024, "LESS").

1. A LoRA warm-up adapter: `--adapter` (a `jft.train` run: every checkpoint it kept, with
   its Adam moments; or an adapter directory: one checkpoint, plain gradients), or one
   trained here, as the paper does, on a random `--warmup-fraction` of the pool for
   `--warmup-epochs` epochs with a checkpoint after each (r 8, alpha 32 on q, k, v, o;
   the paper's r 128, alpha 512 scaled down; `--warmup-config` replaces it).
2. At each checkpoint i, every pool example's gradient of the adapter, as the update Adam
   would make from that checkpoint's moments, and every target example's plain gradient:
   one per example (`jax.vmap`), randomly projected to `--dim` numbers (8192 in the
   paper) and normalised to unit length (`gradients.py`).
3. Inf(z) = Σᵢ η̄ᵢ · mean_j <Γ̂ᵢ(z), ĝᵢ(z'_j)>: the mean cosine similarity to the target
   examples, weighted by checkpoint i's mean learning rate η̄ᵢ (normalised to sum to 1).
   The pool is streamed a batch at a time; only the [M, dim] target features are held.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jft.errors import JftError
from jft.select.gradients import Checkpoint, gradient_features, run_checkpoints
from jft.select.methods.base import Context, Selection, SelectionMethod, register, top

WARMUP_METHOD = {"name": "lora", "r": 8, "alpha": 32, "dropout": 0.1,
                 "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


@register
class Less(SelectionMethod):
    name = "less"
    needs_target = True

    def select(self, context: Context) -> Selection:
        options = context.options
        run = Path(options.adapter) if options.adapter else self.warm_up(context)
        checkpoints = self.checkpoints(context, run)
        steps = ", ".join(f"{c.step if c.step is not None else 'adapter'} "
                          f"(weight {c.weight:.3f}{', Adam' if c.moments else ''})"
                          for c in checkpoints)
        # Cached with --cache-dir: the same checkpoints, target, dim and seed score the
        # same. A run is keyed by its checkpoints alone: resuming a finished warm-up
        # rewrites its other files.
        weights = run / "checkpoints" if (run / "checkpoints").is_dir() else run
        scores = context.cached(f"less-dim{options.dim}-seed{context.seed}",
                                lambda: self.scores(context, checkpoints),
                                sources=[weights, context.target.path])
        return Selection(top(scores, context.budget), scores,
                         report=[f"less: checkpoints {steps}; dim {options.dim}"])

    def scores(self, context: Context, checkpoints: list[Checkpoint]) -> np.ndarray:
        model, options = context.model, context.options
        scores = np.zeros(len(context.pool))
        for number, checkpoint in enumerate(checkpoints, 1):
            where = f"less: checkpoint {number} of {len(checkpoints)}"
            target = np.zeros((len(context.target), options.dim), np.float32)
            for rows, features in gradient_features(
                    model.config, model.params, checkpoint.without_moments(),
                    context.target.examples, dim=options.dim, seed=context.seed,
                    batch_size=context.batch_size, desc=f"{where}, target"):
                target[rows] = features
            mean_target = target.mean(axis=0)
            for rows, features in gradient_features(
                    model.config, model.params, checkpoint, context.pool.examples,
                    dim=options.dim, seed=context.seed, batch_size=context.batch_size,
                    desc=f"{where}, pool"):
                scores[rows] += checkpoint.weight * (features @ mean_target)
        return scores

    def checkpoints(self, context: Context, path: Path) -> list[Checkpoint]:
        from jft.formats.adapters import load_adapter

        model = context.model
        if (path / "checkpoints").is_dir():
            return run_checkpoints(path, model.config, model.params)
        params, (adapter,) = load_adapter(path, model.params, model.config)
        if adapter.method != "lora" or params is not model.params:
            raise JftError(f"--adapter {path}: LESS takes the gradients of a LoRA adapter over "
                           "the unchanged base (not PiSSA-like inits, which rewrite it)")
        return [Checkpoint(adapter, None, 1.0)]

    def warm_up(self, context: Context) -> Path:
        """Trains the warm-up adapter on a random slice of the pool; returns its run."""
        import yaml

        from jft.select.pool import subset_file
        from jft.select.training import steps_for, train_run

        options, pool = context.options, context.pool
        count = max(1, round(options.warmup_fraction * len(pool)))
        chosen = np.random.default_rng(context.seed).choice(len(pool), count, replace=False)
        work = context.work_dir / "less-warmup"
        data = subset_file(pool.path, chosen, work, "data")
        if options.warmup_config:
            raw = {**yaml.safe_load(Path(options.warmup_config).read_text()),
                   "model": options.model}
        else:
            epoch = steps_for(count, options.warmup_batch_size, 1)
            raw = {"model": options.model, "method": WARMUP_METHOD,
                   "data": {"format": pool.format, "max_length": options.max_length,
                            "packing": False},
                   "train": {"steps": epoch * options.warmup_epochs,
                             "batch_size": options.warmup_batch_size,
                             "learning_rate": options.warmup_lr, "schedule": "linear",
                             "warmup_steps": max(1, round(0.03 * epoch * options.warmup_epochs)),
                             "seed": context.seed},
                   "checkpoint": {"every": epoch, "keep": options.warmup_epochs}}
        return train_run(raw, data, work / "run", "the LESS warm-up")
