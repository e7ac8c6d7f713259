"""Bar chart of `benchmarks/vs_peft.py` records: throughput and peak memory per method.

    python benchmarks/plot_vs_peft.py RESULTS.json --out chart.png
    python benchmarks/plot_vs_peft.py part1.json part2.json --out chart.png

One row of panels per shape: tokens/s, then peak memory, with one bar per framework
(jft, torch, torch.compile) for each method (and each sequence length, when a shape was
swept). Memory is the device peak on a GPU; on CPU it is the case process's peak RSS,
the one figure measured the same way for both frameworks. A case without a number (out
of memory, timeout, torch.compile failure) gets a short label where its bar would be.
The title gives the device, dtype, date and the range of the machine's load average
over the cases (vs_peft.py records it: on a shared machine it matters).
`--find-max-seq` records, where present, get a last panel: the longest sequence that
fits. Not part of the test suite; bad input is one `error:` line and exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jft.errors import JftError, run_cli
from jft.generate import ArgumentParser

COLORS = {"jft": "#1f77b4", "torch": "#ff7f0e", "torch.compile": "#2ca02c"}
# jft runs with --jft-config settings are bars of their own, in these colours.
VARIANT_COLORS = ("#9467bd", "#17becf", "#8c564b", "#e377c2")
METHOD_ORDER = ("full", "lora", "dora", "s2ft", "spiel", "lisa")
MIB = 2**20


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python benchmarks/plot_vs_peft.py",
                            description="Bar chart of vs_peft.py records.")
    parser.add_argument("results", nargs="+", type=Path, help="vs_peft.py --json files")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", help="figure title (default: device and dtype)")
    return parser


def read_records(paths: list[Path]) -> list[dict]:
    records = []
    for path in paths:
        try:
            loaded = json.loads(path.read_text())
        except OSError as error:
            raise JftError(f"{path}: cannot read: {error.strerror}") from None
        except json.JSONDecodeError as error:
            raise JftError(f"{path}: not JSON: {error}") from None
        if not isinstance(loaded, list) or not all(
                isinstance(r, dict) and "framework" in r for r in loaded):
            raise JftError(f"{path}: not a list of vs_peft.py records")
        records += loaded
    if not records:
        raise JftError("no records to plot")
    return records


def memory_of(record: dict) -> tuple[float | None, str]:
    """(MiB, what it is): the device peak on a GPU, the process's peak RSS on CPU."""
    if str(record.get("device", "")).startswith("cpu"):
        value, label = record.get("rss_peak_bytes"), "peak RSS of the process (MiB)"
    else:
        value, label = record.get("peak_bytes"), "device peak memory (MiB)"
    return (None if value is None else value / MIB), label


def failure_label(record: dict) -> str:
    error = record.get("error") or ""
    if error == "out of memory":
        return "OOM"
    if error.startswith("torch.compile failed"):
        return "compile\nfailed"
    if error.startswith(("timeout", "stopped at --deadline")):
        return "timeout"
    if error.startswith("not run"):
        return "not run"
    return "failed"


def framework_of(record: dict) -> str:
    """The bar's name: the framework, with jft's --jft-config settings if any."""
    settings = record.get("jft_config") or {}
    if not settings:
        return record["framework"]
    return f"{record['framework']} ({', '.join(f'{k}={v}' for k, v in settings.items())})"


def colors_for(names: list[str]) -> dict[str, str]:
    variants = iter(VARIANT_COLORS * len(names))
    return {name: COLORS.get(name) or next(variants) for name in names}


def groups_of(records: list[dict]) -> list[tuple[str, int]]:
    """The x-axis groups of one shape: (method, seq), methods in the usual order."""
    keys = {(r["method"], r["seq"]) for r in records}
    return sorted(keys, key=lambda k: (METHOD_ORDER.index(k[0]) if k[0] in METHOD_ORDER
                                       else len(METHOD_ORDER), k[0], k[1]))


def bar_panel(ax, records: list[dict], value_of, ylabel: str, title: str) -> None:
    groups = groups_of(records)
    frameworks = sorted({framework_of(r) for r in records},
                        key=lambda f: (not f.startswith("jft"), f != "jft", f))
    colors = colors_for(frameworks)
    width = 0.8 / max(len(frameworks), 1)
    by_key = {(r["method"], r["seq"], framework_of(r)): r for r in records}
    tallest = max([v for r in records if (v := value_of(r)) is not None] or [1.0])
    for i, framework in enumerate(frameworks):
        label = framework  # on the framework's first bar only: one legend entry each
        for x, (method, seq) in enumerate(groups):
            record = by_key.get((method, seq, framework))
            if record is None:
                continue
            position = x + (i - (len(frameworks) - 1) / 2) * width
            value = value_of(record) if not record.get("error") else None
            if value is None:
                ax.text(position, tallest * 0.02, failure_label(record), rotation=90,
                        ha="center", va="bottom", fontsize=7, color=colors[framework])
                continue
            ax.bar(position, value, width, color=colors[framework], label=label)
            label = None
    several_seqs = len({seq for _, seq in groups}) > 1
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\n{s}" if several_seqs else m for m, s in groups], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def max_seq_panel(ax, records: list[dict]) -> None:
    names = [framework_of(r) for r in records]
    colors = colors_for(sorted(set(names)))
    labels = [f"{r['shape']}\n{r['method']}\n{name}" for r, name in zip(records, names,
                                                                       strict=True)]
    values = [r.get("max_seq") or 0 for r in records]
    ax.bar(range(len(values)), values, color=[colors[name] for name in names])
    for x, value in enumerate(values):
        ax.text(x, value, str(value) if value else "none", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("tokens per sequence")
    ax.set_title(f"longest sequence that fits (batch {records[0]['batch']})", fontsize=9)


def plot(records: list[dict], out: Path, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [r for r in records if r.get("search") != "max_seq"]
    searches = [r for r in records if r.get("search") == "max_seq"]
    shapes = list(dict.fromkeys(r["shape"] for r in sweeps))
    rows = len(shapes) + bool(searches)
    fig, axes = plt.subplots(rows, 2, figsize=(13, 3.6 * rows), squeeze=False)
    for row, shape in enumerate(shapes):
        mine = [r for r in sweeps if r["shape"] == shape]
        batches = sorted({r["batch"] for r in mine})
        seqs = sorted({r["seq"] for r in mine})
        where = f"{shape}, batch {'/'.join(map(str, batches))} x seq {'/'.join(map(str, seqs))}"
        bar_panel(axes[row][0], mine, lambda r: r.get("tokens_per_s"), "tokens / s",
                  f"{where}: throughput (higher is better)")
        label = memory_of(mine[0])[1]
        bar_panel(axes[row][1], mine, lambda r: memory_of(r)[0], label,
                  f"{where}: memory (lower is better)")
    if searches:
        max_seq_panel(axes[-1][0], searches)
        axes[-1][1].axis("off")
    first = records[0]
    loads = [x for r in records for x in r.get("load_average") or ()]
    # On a shared machine the load says what the timings competed with.
    load = f", load average {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    fig.suptitle(title or f"jft vs transformers + PEFT: {first.get('device')}, "
                          f"{first.get('dtype')}, {str(first.get('date', ''))[:10]}{load}",
                 fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.out.suffix.lower() != ".png":
        raise JftError(f"--out {args.out}: give a .png path")
    plot(read_records(args.results), args.out, args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
