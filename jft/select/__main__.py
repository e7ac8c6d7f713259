"""`python -m jft.select --model M --pool POOL --method NAME --budget N --out SUBSET`:
choose what to fine-tune on (docs/selection.md).

`python -m jft.select active CONFIG.yaml`: active learning with LoRA (STAR), rounds of
training and uncertainty sampling.

The subset keeps the pool's records unchanged, in the pool's format; SUBSET.scores.jsonl
gets every pool record's index, score, cluster and whether it was chosen; a short report
goes to stderr.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

from jft.errors import JftError, run_cli


def build_parser():
    from jft.generate import ArgumentParser

    parser = ArgumentParser(
        prog="python -m jft.select",
        description="Select a subset of a data pool to fine-tune on; or `active CONFIG.yaml` "
                    "for active learning. See docs/selection.md.")
    parser.add_argument("--model", required=True,
                        help="bundled name, HF directory or .gguf: the model that scores")
    parser.add_argument("--adapter", help="applied while scoring; for less: the warm-up (a "
                        "jft.train run, all its checkpoints, or a LoRA adapter directory)")
    parser.add_argument("--pool", required=True, help="the candidates: .jsonl, .json, "
                        ".parquet, .csv or a datasets folder, as jft.train reads")
    parser.add_argument("--target", help="examples of the task to select for (less, got-d)")
    parser.add_argument("--method", required=True, help="less, got-d, kmq, ifd, perplexity, "
                        "dedup or random")
    parser.add_argument("--budget", required=True,
                        help="how many to choose: a count (500), a fraction (0.05) or 5%%")
    parser.add_argument("--out", required=True, help="the subset file (the pool's format)")
    parser.add_argument("--format", default="auto",
                        help="text, prompt_completion, chat or auto (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=512,
                        help="tokens per example; longer ones are cut (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="examples per scoring batch (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--cache-dir", help="keep the pool's embeddings and losses here, "
                        "so that other methods, budgets and options reuse them")
    parser.add_argument("--work-dir", help="where less and iterative kmq train (default: "
                        "OUT's name + .work)")
    less = parser.add_argument_group("less")
    less.add_argument("--dim", type=int, default=8192,
                      help="projected gradient size (default: %(default)s)")
    less.add_argument("--warmup-fraction", type=float, default=0.05,
                      help="share of the pool the warm-up trains on (default: %(default)s)")
    less.add_argument("--warmup-epochs", type=int, default=4, help="(default: %(default)s)")
    less.add_argument("--warmup-lr", type=float, default=2e-4, help="(default: %(default)s)")
    less.add_argument("--warmup-batch-size", type=int, default=8,
                      help="(default: %(default)s)")
    less.add_argument("--warmup-config", help="a jft.train config for the warm-up instead")
    got_d = parser.add_argument_group("got-d")
    got_d.add_argument("--metric", default="euclidean",
                       help="euclidean, sqeuclidean or cosine (default: %(default)s)")
    got_d.add_argument("--solver", default="sinkhorn",
                       help="sinkhorn or emd (exact) (default: %(default)s)")
    got_d.add_argument("--reg", type=float, default=0.05,
                       help="entropic regularisation, cost scaled to [0, 1] "
                            "(default: %(default)s)")
    kmq = parser.add_argument_group("kmq")
    kmq.add_argument("--clusters", default="auto",
                     help="k, or auto (best silhouette) (default: %(default)s)")
    kmq.add_argument("--quality", default="perplexity",
                     help="perplexity or none (default: %(default)s)")
    kmq.add_argument("--temperature", type=float, default=1.0, help="(default: %(default)s)")
    kmq.add_argument("--allocation", default="proportional",
                     help="proportional or uniform (default: %(default)s)")
    kmq.add_argument("--iterations", type=int, default=1,
                     help="iterative kMQ rounds; > 1 trains between them (default: "
                          "%(default)s)")
    kmq.add_argument("--train-config", help="iterative kmq: the jft.train config of a round")
    kmq.add_argument("--max-new-tokens", type=int, default=64,
                     help="iterative kmq: answer length (default: %(default)s)")
    filters = parser.add_argument_group("ifd, perplexity, dedup")
    filters.add_argument("--ifd-max", type=float, default=1.0, help="(default: %(default)s)")
    filters.add_argument("--keep", default="low", help="perplexity: low or high (default: "
                         "%(default)s)")
    filters.add_argument("--threshold", type=float, default=0.9,
                         help="dedup: the highest cosine similarity kept (default: "
                              "%(default)s)")
    return parser


def main(argv: list[str]) -> int:
    if argv[:1] == ["active"]:
        from jft.select.active import main as active

        return active(argv[1:])
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    import datasets

    datasets.disable_progress_bars()
    select(args)
    return 0


def select(args):
    """Runs one selection from parsed arguments; returns (the Selection, the Pool)."""
    import jft
    from jft.select.methods import Context, get_method
    from jft.select.pool import (
        output_paths,
        parse_budget,
        read_pool,
        write_scores,
        write_subset,
    )
    from jft.train import _status_line

    started = time.perf_counter()
    method = get_method(args.method)
    check_options(args)
    out, scores_path = output_paths(args.pool, args.out)
    if method.needs_target and args.target is None:
        raise JftError(f"--method {args.method} scores against a target set; give --target "
                       "(examples of the task to select for)")
    # LESS takes the gradients of the adapter itself, over the plain base.
    adapter = None if args.method == "less" else args.adapter
    with _status_line(f"loading model {args.model}"):
        model = jft.load(args.model, adapter=adapter)
    with _status_line(f"reading {args.pool}"):
        pool = read_pool(args.pool, args.format, model.tokenizer, args.max_length)
    target = None
    if args.target is not None:
        with _status_line(f"reading {args.target}"):
            target = read_pool(args.target, pool.format, model.tokenizer, args.max_length)
    budget = parse_budget(args.budget, len(pool))
    work_dir = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
    context = Context(model, pool, target, budget, args, args.seed, args.batch_size, work_dir,
                      Path(args.cache_dir) if args.cache_dir else None)
    selection = method.select(context)
    write_subset(pool.path, selection.indices, out)
    write_scores(scores_path, selection.scores, selection.clusters, selection.indices)
    lines = [f"{args.method}: chose {len(selection.indices)} of {len(pool)} records "
             f"(budget {budget}) in {time.perf_counter() - started:.1f} s",
             *selection.report, f"wrote {out} and {scores_path}"]
    print("\n".join(lines), file=sys.stderr)
    return selection, pool


def check_options(args) -> None:
    """Every option's value, before the model loads: a typo fails in a second, not after
    the pool's embeddings."""
    from jft.select.pool import POOL_FORMATS, parse_budget
    from jft.select.projection import check_dim

    def choice(flag, value, valid):
        if value not in valid:
            raise JftError(f"{flag} {value!r}; valid: {', '.join(valid)}")

    def bound(flag, value, low, high=None, inclusive=True):
        ok = value >= low if inclusive else value > low
        if not ok or (high is not None and value > high):
            upper = f" and at most {high}" if high is not None else ""
            raise JftError(f"{flag} {value!r}; expected {'at least' if inclusive else 'more than'} "
                           f"{low}{upper}")

    parse_budget(args.budget, sys.maxsize)
    choice("--format", args.format, ("auto", *POOL_FORMATS))
    bound("--batch-size", args.batch_size, 1)
    bound("--max-length", args.max_length, 2)
    check_dim(args.dim)
    bound("--warmup-fraction", args.warmup_fraction, 0, 1, inclusive=False)
    bound("--warmup-epochs", args.warmup_epochs, 1)
    bound("--warmup-lr", args.warmup_lr, 0, inclusive=False)
    bound("--warmup-batch-size", args.warmup_batch_size, 1)
    choice("--metric", args.metric, ("euclidean", "sqeuclidean", "cosine"))
    choice("--solver", args.solver, ("sinkhorn", "emd"))
    bound("--reg", args.reg, 0, inclusive=False)
    if args.clusters != "auto" and not (args.clusters.isdigit() and int(args.clusters) >= 1):
        raise JftError(f"--clusters {args.clusters!r}; expected auto or a count from 1 to the "
                       "pool size")
    choice("--quality", args.quality, ("perplexity", "none"))
    bound("--temperature", args.temperature, 0, inclusive=False)
    choice("--allocation", args.allocation, ("proportional", "uniform"))
    bound("--iterations", args.iterations, 1)
    bound("--max-new-tokens", args.max_new_tokens, 1)
    bound("--ifd-max", args.ifd_max, 0, inclusive=False)
    choice("--keep", args.keep, ("low", "high"))
    bound("--threshold", args.threshold, -1, 1)
    if args.method == "kmq" and args.iterations > 1 and args.train_config is None:
        raise JftError("--iterations > 1 trains between rounds: give --train-config, a "
                       "jft.train config (its model, data.train and train.steps are set here)")
    if args.method == "got-d":
        from jft.select.transport import _require_pot

        _require_pot()


if __name__ == "__main__":
    sys.exit(run_cli(main))
