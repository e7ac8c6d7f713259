"""Continual-learning metrics over an accuracy matrix, their plots, and a table comparing runs.

`matrix[i][j]` is the score on task j after training stage i (0-based). A run still in
progress has only its first k rows; every metric is then taken on the leading k x k block,
as TRACE's overall performance at stage k is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from jft.errors import JftError

NONE_CELL = "–"


def summary(matrix: Sequence[Sequence[Any]],
            initial: Sequence[float] | None = None) -> dict[str, float | None]:
    """ACC, BWT, FWT and forgetting of the leading k x k block (k = rows done, a = matrix).

    - average_accuracy = (1/k) Σ_{j<k} a[k-1][j]
    - bwt (GEM, Lopez-Paz & Ranzato 2017) = (1/(k-1)) Σ_{j<k-1} (a[k-1][j] - a[j][j])
    - fwt (GEM) = (1/(k-1)) Σ_{j=1..k-1} (a[j-1][j] - initial[j]); None without `initial`
    - forgetting (Chaudhry et al. 2018) =
      (1/(k-1)) Σ_{j<k-1} (max_{l in [j, k-2]} a[l][j] - a[k-1][j])

    bwt, fwt and forgetting are None when k < 2; all four are None when no stage is done.
    The entries above the diagonal are not needed, except a[j-1][j] for FWT.
    """
    a, _ = _square(matrix, initial)
    k = len(a)
    out: dict[str, float | None] = {"average_accuracy": None, "bwt": None, "fwt": None,
                                    "forgetting": None}
    if k == 0:
        return out
    last = k - 1
    out["average_accuracy"] = _mean(a[last][j] for j in range(k))
    if k < 2:
        return out
    out["bwt"] = _mean(a[last][j] - a[j][j] for j in range(last))
    out["forgetting"] = _mean(max(a[l][j] for l in range(j, last)) - a[last][j]
                              for j in range(last))
    if initial is not None:
        for j in range(1, k):
            _check_number(a[j - 1][j], f"matrix[{j - 1}][{j}] (FWT needs the score on task "
                                       f"{j} before training on it)")
        out["fwt"] = _mean(a[j - 1][j] - float(initial[j]) for j in range(1, k))
    return out


def _square(matrix: Sequence[Sequence[Any]],
            initial: Sequence[float] | None) -> tuple[list[list[Any]], int]:
    """Checks the matrix (and `initial`) and returns its rows as lists, and T."""
    if isinstance(matrix, np.ndarray):
        matrix = matrix.tolist()
    if isinstance(initial, np.ndarray):
        initial = initial.tolist()
    if not isinstance(matrix, Sequence) or isinstance(matrix, str):
        raise JftError(f"matrix must be a list of rows, got {type(matrix).__name__}")
    rows = [list(row) if isinstance(row, Sequence) and not isinstance(row, str) else row
            for row in matrix]
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise JftError(f"matrix[{i}] must be a list of scores, got {type(row).__name__}")
    if initial is not None and (not isinstance(initial, Sequence) or isinstance(initial, str)):
        raise JftError(f"initial must be a list of scores, got {type(initial).__name__}")
    tasks = len(rows[0]) if rows else (len(initial) if initial is not None else 0)
    for i, row in enumerate(rows):
        if len(row) != tasks:
            raise JftError(f"matrix[{i}] has {len(row)} scores but matrix[0] has {tasks}; "
                           "every row needs one score per task")
    if len(rows) > tasks:
        raise JftError(f"matrix has {len(rows)} rows (stages) but only {tasks} tasks; "
                       "there is at most one row per task")
    for i, row in enumerate(rows):
        for j in range(i + 1):
            _check_number(row[j], f"matrix[{i}][{j}]")
    if initial is not None:
        if len(initial) != tasks:
            raise JftError(f"initial has {len(initial)} scores but the matrix has {tasks} "
                           "tasks; give the initial model's score on every task")
        for j, value in enumerate(initial):
            _check_number(value, f"initial[{j}]")
    return rows, tasks


def _check_number(value: Any, where: str):
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise JftError(f"{where} is {value!r}; it must be a finite number")


def _mean(values) -> float:
    values = [float(value) for value in values]
    return sum(values) / len(values)


def _grid(tasks: Sequence[str], matrix: Sequence[Sequence[Any]]) -> np.ndarray:
    """The T x T matrix as floats, NaN where a stage has not run or a score is missing."""
    rows, count = _square(matrix, None)
    if rows and count != len(tasks):
        raise JftError(f"the matrix has {count} tasks but {len(tasks)} task names were given: "
                       f"{list(tasks)}")
    grid = np.full((len(tasks), len(tasks)), np.nan)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            if isinstance(value, Real) and not isinstance(value, bool):
                grid[i, j] = float(value)
    return grid


def write_heatmap(path: str | Path, tasks: Sequence[str], matrix: Sequence[Sequence[Any]],
                  title: str = "Score on each task after each training stage") -> Path:
    """A PNG heatmap of a[i][j] (rows "after <task i>", columns task j), each cell annotated
    with its score; the rows of stages not yet run are left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tasks:
        raise JftError("write_heatmap needs at least one task name")
    grid = _grid(tasks, matrix)
    size = len(tasks)
    figure, axis = plt.subplots(figsize=(2.0 + 1.1 * size, 1.5 + 0.8 * size))
    image = axis.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axis, label="score")
    axis.set_xticks(range(size), labels=list(tasks), rotation=30, ha="right")
    axis.set_yticks(range(size), labels=[f"after {task}" for task in tasks])
    axis.set_xlabel("evaluated on")
    axis.set_ylabel("training stage")
    middle = (image.norm.vmin + image.norm.vmax) / 2 if np.isfinite(grid).any() else 0.0
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            # Dark text on viridis' bright (high) end, light text on its dark end.
            colour = "black" if value > middle else "white"
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour)
    axis.set_title(title)
    return _save(figure, path)


def write_general_plot(path: str | Path, tasks: Sequence[str], general_ppl: Sequence[float],
                       title: str = "General-text perplexity after each stage") -> Path:
    """A PNG line of the general-text perplexity before training ("initial") and after each
    stage done; `general_ppl` has 1 + stages-done entries, the x axis names every stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not 1 <= len(general_ppl) <= len(tasks) + 1:
        raise JftError(f"general_ppl has {len(general_ppl)} values; it needs the initial one "
                       f"and one per stage done, 1 to {len(tasks) + 1} for {len(tasks)} tasks")
    for index, value in enumerate(general_ppl):
        _check_number(value, f"general_ppl[{index}]")
    labels = ["initial", *tasks]
    figure, axis = plt.subplots(figsize=(max(5.0, 1.2 * len(labels)), 4))
    axis.plot(range(len(general_ppl)), [float(value) for value in general_ppl], "o-")
    axis.set_xticks(range(len(labels)), labels=labels, rotation=30, ha="right")
    axis.set_xlim(-0.5, len(labels) - 0.5)
    axis.set_xlabel("after stage")
    axis.set_ylabel("perplexity")
    axis.set_title(title)
    return _save(figure, path)


_COLUMNS = ("run", "strategy", "method", "ACC", "BWT", "FWT", "forgetting",
            "general ppl (initial -> final)", "time", "trainable params")


def compare_table(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A GitHub markdown table of runs over the same task sequence (records as in
    continual.json): ACC, BWT and FWT (GEM), forgetting (Chaudhry et al. 2018), the general
    perplexity before and after, wall time and trainable parameters. A run not finished is
    named with "(stage k of T)"; a missing value is shown as "–"."""
    if not runs:
        raise JftError("compare_table needs at least one run")
    first_name, first = runs[0]
    first_tasks = _tasks(first_name, first)
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for name, record in runs:
        tasks = _tasks(name, record)
        if tasks != first_tasks:
            raise JftError(f"run {name!r} has tasks {tasks} but run {first_name!r} has "
                           f"{first_tasks}; only runs over the same task sequence compare")
        done = len(record.get("matrix") or [])
        label = name if done >= len(tasks) else f"{name} (stage {done} of {len(tasks)})"
        cells = [label, record.get("strategy"), record.get("method"),
                 _score(record.get("average_accuracy")), _score(record.get("bwt")),
                 _score(record.get("fwt")), _score(record.get("forgetting")),
                 _perplexities(record.get("general_ppl")), _duration(record.get("seconds")),
                 _count(record.get("trainable_params"))]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _tasks(name: str, record: dict[str, Any]) -> list[str]:
    tasks = record.get("tasks") if isinstance(record, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise JftError(f"run {name!r} has no 'tasks' list; is it a continual.json record?")
    return tasks


def _cell(value: Any) -> str:
    # A "|" inside a cell would end it early.
    return NONE_CELL if value is None else str(value).replace("|", "\\|")


def _score(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"


def _perplexities(values: Sequence[float] | None) -> str | None:
    if not values:
        return None
    final = f"{values[-1]:.2f}" if len(values) > 1 else NONE_CELL
    return f"{values[0]:.2f} -> {final}"


def _duration(seconds: float | None) -> str | None:
    """"4.2 s", "42 s", "3 min 05 s", "1 h 02 min"."""
    if seconds is None:
        return None
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _count(value: int | None) -> str | None:
    return None if value is None else f"{value:,}"


def _save(figure, path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
