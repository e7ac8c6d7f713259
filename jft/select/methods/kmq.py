"""`kmq`: k-means over embeddings, then a quality-weighted draw across the clusters
(Yu et al. 2024, "Diversify and conquer").

Static kMQ: the pool's embeddings (mean of the model's final hidden states) are
clustered by k-means (`kmeans.py`; k by the best silhouette among a few candidates, or
`--clusters K`); each cluster gets a share of the budget proportional to its size
(`--allocation uniform`: equal shares, as the authors' code), drawn without replacement
with p ∝ exp(quality / `--temperature`). Quality is minus the mean cross-entropy of the
example's targets under the model (`--quality perplexity`), or none (a uniform draw).

Iterative kMQ (`--iterations N`, N > 1): the budget is taken in N rounds of b/N. After
each round but the last, LoRA trains one epoch on everything chosen so far
(`--train-config`, a `jft.train` config; its model, data.train and steps are set here), the
model answers the round's prompts greedily, and each gets the gap S = NLL(gold answer)
− NLL(its own answer) under the trained model: how far the gold answer still is from
what the model says (the paper's score(x ⊕ y_gold) − score(x ⊕ y_gen), with the model's
likelihood as the scorer, since no reward model ships here). Cluster weights move by the
softmax of their mean gaps, and the next round's shares follow the weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jft.errors import JftError
from jft.select import diversity
from jft.select.features import generated_examples, target_losses
from jft.select.kmeans import choose_k, kmeans
from jft.select.methods.base import Context, Selection, SelectionMethod, register

CLUSTER_CANDIDATES = (4, 8, 16, 32, 64, 128)


@register
class KMeansQuality(SelectionMethod):
    name = "kmq"

    def select(self, context: Context) -> Selection:
        options, pool = context.options, context.pool
        vectors = context.embeddings()
        k, report = self.clusters(vectors, context)
        labels = kmeans(vectors, k, seed=context.seed).labels
        quality = self.quality(context)
        if options.iterations <= 1:
            chosen = diversity.kmq_select(labels, quality, context.budget,
                                          temperature=options.temperature, seed=context.seed,
                                          allocation=options.allocation, num_clusters=k)
        else:
            chosen, weights = self.iterate(context, labels, k, quality)
            report.append("kmq: final cluster weights " + " ".join(f"{w:.3f}" for w in weights))
        scores = np.full(len(pool), np.nan)
        scores[chosen] = quality[chosen] if quality is not None else 0.0
        return Selection(chosen, scores, labels, report)

    def clusters(self, vectors: np.ndarray, context: Context) -> tuple[int, list[str]]:
        value = context.options.clusters
        if value != "auto":
            try:
                k = int(value)
            except ValueError:
                k = 0
            if not 1 <= k <= len(vectors):
                raise JftError(f"--clusters {value!r}; expected auto or a count from 1 to the "
                               f"pool size ({len(vectors)})")
            return k, [f"kmq: {k} clusters"]
        limit = min(context.budget, len(vectors) - 1)
        candidates = [k for k in CLUSTER_CANDIDATES if k <= limit] or [min(2, limit)]
        if candidates[-1] < 2:
            return 1, ["kmq: 1 cluster (the pool is too small to split)"]
        k, scores = choose_k(vectors, candidates, seed=context.seed)
        shown = ", ".join(f"{c}: {s:.3f}" for c, s in scores.items())
        return k, [f"kmq: {k} clusters by silhouette ({shown})"]

    def quality(self, context: Context) -> np.ndarray | None:
        option = context.options.quality
        if option == "none":
            return None
        if option != "perplexity":
            raise JftError(f"--quality {option!r}; valid: perplexity, none")
        quality = -context.losses()
        # An example cut to no target token (--max-length) has no loss: the lowest quality.
        finite = np.isfinite(quality)
        return np.where(finite, quality, quality[finite].min() if finite.any() else 0.0)

    def iterate(self, context: Context, labels, k: int, quality):
        """Iterative kMQ: (the chosen indices, the final cluster weights)."""
        import yaml

        from jft.formats.adapters import load_adapter
        from jft.select.pool import subset_file
        from jft.select.training import steps_for, train_run

        options, model, pool = context.options, context.model, context.pool
        if pool.prompts is None:
            raise JftError(f"{pool.path}: format text has no prompts to answer; iterative "
                           "kmq needs prompt_completion or chat data")
        raw = {**yaml.safe_load(Path(options.train_config).read_text()), "model": options.model}
        rounds, weights = options.iterations, np.full(k, 1.0 / k)
        taken = np.zeros(len(pool), bool)
        chosen: list[int] = []
        for round_number in range(rounds):
            size = context.budget // rounds + (context.budget % rounds if round_number ==
                                              rounds - 1 else 0)
            available = np.bincount(labels[~taken], minlength=k)
            shares = diversity.weighted_cluster_budgets(weights, available, size,
                                                        seed=context.seed + round_number)
            new = diversity.sample_within_clusters(
                labels, quality, shares, temperature=options.temperature,
                seed=context.seed + round_number, exclude=taken)
            taken[new] = True
            chosen += new.tolist()
            if round_number == rounds - 1:
                break
            work = context.work_dir / f"kmq-round-{round_number + 1}"
            data = subset_file(pool.path, np.asarray(chosen), work, "data")
            batch = raw.get("train", {}).get("batch_size", 8)
            round_raw = {**raw, "train": {**raw.get("train", {}),
                                          "steps": steps_for(len(chosen), batch, 1)}}
            run = train_run(round_raw, data, work / "run", f"kmq round {round_number + 1}")
            params, adapters = load_adapter(run, model.params, model.config)
            gaps = self.gaps(context, params, adapters, new)
            weights = diversity.update_cluster_weights(weights, labels, new, gaps)
        return np.asarray(chosen), weights

    def gaps(self, context: Context, params, adapters, rows: np.ndarray) -> np.ndarray:
        """NLL(gold) − NLL(the model's own greedy answer) of the pool examples `rows`."""
        from jft.training.data import TokenizedExamples

        pool, model = context.pool, context.model

        def subset(examples):
            return TokenizedExamples.from_examples(examples[int(i)] for i in rows)

        gold = target_losses(model.config, params, adapters, subset(pool.examples),
                             batch_size=context.batch_size, desc="kmq: gold answers")
        own = generated_examples(model.config, params, adapters, subset(pool.prompts),
                                 model.stop_ids, max_new_tokens=context.options.max_new_tokens,
                                 batch_size=context.batch_size, desc="kmq: answering")
        said = target_losses(model.config, params, adapters, own,
                             batch_size=context.batch_size, desc="kmq: own answers")
        return np.nan_to_num(gold - said)
