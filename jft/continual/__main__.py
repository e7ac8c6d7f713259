"""`python -m jft.continual CONFIG.yaml [key.sub=value ...] [--overwrite]`: train a
sequence of tasks with a continual-learning strategy (docs/continual.md).

`python -m jft.continual compare RUN1 RUN2 ...`: the summary table (markdown) of runs
on the same task sequence.
"""

from __future__ import annotations

import sys
import warnings

from jft.errors import JftError, run_cli


def build_parser():
    from jft.generate import ArgumentParser

    parser = ArgumentParser(
        prog="python -m jft.continual",
        description="Train tasks in order with a continual strategy, evaluating every task "
                    "after each; or `compare RUN ...`. See docs/continual.md.")
    parser.add_argument("config", nargs="?", help="YAML config file (or `compare`)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides, e.g. continual.strategy=replay; after "
                             "`compare`: the run directories")
    parser.add_argument("--overwrite", action="store_true",
                        help="move an existing run in output_dir aside and start fresh")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.config == "compare":
        return compare(args.overrides)
    from jft.continual.config import load_continual_config
    from jft.continual.run import ContinualRun

    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    import datasets

    datasets.disable_progress_bars()
    config = load_continual_config(args.config, args.overrides)
    return ContinualRun(config, overwrite=args.overwrite).run()


def compare(runs: list[str]) -> int:
    import json
    from pathlib import Path

    from jft.continual.metrics import compare_table
    from jft.continual.run import RESULTS_FILE

    if not runs:
        raise JftError("compare needs run directories: python -m jft.continual compare RUN ...")
    records = []
    for run in runs:
        path = Path(run) / RESULTS_FILE
        try:
            records.append((str(run), json.loads(path.read_text())))
        except FileNotFoundError:
            raise JftError(f"{path}: no such file; give continual run directories") from None
        except json.JSONDecodeError as error:
            raise JftError(f"{path}: not valid JSON ({error})") from None
    print(compare_table(records).rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
