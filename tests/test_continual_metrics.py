"""Continual-learning metrics (ACC, GEM's BWT and FWT, Chaudhry's forgetting) against numbers
worked out by hand, their plots, and the table comparing runs."""

from __future__ import annotations

import math

import matplotlib.image
import pytest

from jft.continual.metrics import compare_table, summary, write_general_plot, write_heatmap
from jft.errors import JftError

# a[i][j]: score on task j after stage i.
THREE = [[0.8, 0.3, 0.2],
         [0.6, 0.9, 0.4],
         [0.7, 0.5, 0.95]]
THREE_INITIAL = [0.1, 0.2, 0.3]

# Task 0 peaks after stage 1 and task 1 after stage 2, not on the diagonal, so forgetting
# (from the best earlier score) differs from -BWT (from the score just after training).
FOUR = [[0.50, 0.10, 0.20, 0.30],
        [0.70, 0.60, 0.25, 0.35],
        [0.65, 0.80, 0.40, 0.45],
        [0.55, 0.70, 0.30, 0.85]]
FOUR_INITIAL = [0.0, 0.05, 0.10, 0.20]


def _assert_summary(actual: dict, expected: dict):
    assert set(actual) == {"average_accuracy", "bwt", "fwt", "forgetting"}
    for key, value in expected.items():
        if value is None:
            assert actual[key] is None, key
        else:
            assert actual[key] == pytest.approx(value, abs=1e-12), key


def test_summary_of_a_full_3x3_matrix_matches_the_hand_computation():
    _assert_summary(summary(THREE, THREE_INITIAL), {
        "average_accuracy": 0.7166666666666667,  # (0.7 + 0.5 + 0.95) / 3 = 2.15 / 3
        "bwt": -0.25,  # ((0.7 - 0.8) + (0.5 - 0.9)) / 2 = (-0.1 - 0.4) / 2
        "fwt": 0.1,  # ((a01 0.3 - b1 0.2) + (a12 0.4 - b2 0.3)) / 2 = (0.1 + 0.1) / 2
        "forgetting": 0.25,  # ((max(0.8, 0.6) - 0.7) + (max(0.9) - 0.5)) / 2 = (0.1 + 0.4) / 2
    })


def test_summary_of_a_4x4_matrix_takes_forgetting_from_the_best_earlier_score():
    _assert_summary(summary(FOUR, FOUR_INITIAL), {
        "average_accuracy": 0.6,  # (0.55 + 0.70 + 0.30 + 0.85) / 4 = 2.40 / 4
        # ((0.55 - 0.50) + (0.70 - 0.60) + (0.30 - 0.40)) / 3 = (0.05 + 0.10 - 0.10) / 3
        "bwt": 0.016666666666666666,
        # ((0.10 - 0.05) + (0.25 - 0.10) + (0.45 - 0.20)) / 3 = (0.05 + 0.15 + 0.25) / 3
        "fwt": 0.15,
        # j=0: max(0.50, 0.70, 0.65) - 0.55 = 0.15; j=1: max(0.60, 0.80) - 0.70 = 0.10;
        # j=2: max(0.40) - 0.30 = 0.10; (0.15 + 0.10 + 0.10) / 3 = 0.35 / 3
        "forgetting": 0.11666666666666667,
    })


def test_summary_of_a_partial_matrix_uses_the_leading_block():
    # Stage 2 of 3; the scores no metric needs (task 2 before stage 1) may be missing.
    partial = [[0.8, 0.3, None],
               [0.6, 0.9, None]]
    _assert_summary(summary(partial, THREE_INITIAL), {
        "average_accuracy": 0.75,  # (0.6 + 0.9) / 2
        "bwt": -0.2,  # 0.6 - 0.8
        "fwt": 0.1,  # a01 0.3 - b1 0.2
        "forgetting": 0.2,  # max(0.8) - 0.6
    })
    # The same as the first two rows of the full matrix.
    assert summary(partial, THREE_INITIAL) == summary(THREE[:2], THREE_INITIAL)


def test_summary_of_one_task_has_only_average_accuracy():
    _assert_summary(summary([[0.42]], [0.1]),
                    {"average_accuracy": 0.42, "bwt": None, "fwt": None, "forgetting": None})
    # Stage 1 of 3: still no transfer or forgetting to measure.
    _assert_summary(summary([[0.42, None, None]]),
                    {"average_accuracy": 0.42, "bwt": None, "fwt": None, "forgetting": None})


def test_summary_without_initial_scores_has_no_fwt():
    result = summary(THREE)
    assert result["fwt"] is None
    assert result["bwt"] == pytest.approx(-0.25)
    assert result["forgetting"] == pytest.approx(0.25)


def test_summary_before_any_stage_is_all_none():
    assert summary([]) == {"average_accuracy": None, "bwt": None, "fwt": None,
                           "forgetting": None}


@pytest.mark.parametrize(("matrix", "initial", "words"), [
    ([[0.1, 0.2], [0.3]], None, ["matrix[1]", "1 scores", "2"]),
    ([[0.1], [0.2]], None, ["2 rows", "1 tasks"]),
    ([[0.1, 0.2], [math.nan, 0.4]], None, ["matrix[1][0]", "nan", "finite"]),
    ([[None, 0.2], [0.3, 0.4]], None, ["matrix[0][0]", "None"]),
    ([[0.1, 0.2], [0.3, "0.4"]], None, ["matrix[1][1]", "'0.4'"]),
    ([[0.1, 0.2], [0.3, 0.4]], [0.1], ["initial", "1 scores", "2 tasks"]),
    ([[0.1, 0.2], [0.3, 0.4]], [0.1, math.inf], ["initial[1]", "inf"]),
    ([[0.1, None], [0.3, 0.4]], [0.1, 0.2], ["matrix[0][1]", "FWT"]),
    (0.5, None, ["matrix", "list of rows", "float"]),
    ([0.1, 0.2], None, ["matrix[0]", "list of scores"]),
])
def test_summary_refuses_a_bad_matrix_naming_what_is_wrong(matrix, initial, words):
    with pytest.raises(JftError) as error:
        summary(matrix, initial)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def _assert_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] == 4 and image.shape[0] > 0 and image.shape[1] > 0


def test_heatmap_png_is_written_for_a_full_and_a_partial_matrix(tmp_path):
    tasks = ["agnews", "amazon", "yahoo"]
    full = write_heatmap(tmp_path / "full.png", tasks, THREE)
    partial = write_heatmap(tmp_path / "partial.png", tasks, [[0.8, 0.3, None]])
    for path in (full, partial):
        _assert_png(path)


def test_heatmap_refuses_task_names_that_do_not_match_the_matrix(tmp_path):
    with pytest.raises(JftError, match="3 tasks but 2 task names"):
        write_heatmap(tmp_path / "bad.png", ["a", "b"], THREE)


def test_general_plot_png_is_written_before_all_stages_are_done(tmp_path):
    tasks = ["agnews", "amazon", "yahoo"]
    _assert_png(write_general_plot(tmp_path / "done.png", tasks, [12.5, 12.9, 13.4, 13.1]))
    _assert_png(write_general_plot(tmp_path / "partial.png", tasks, [12.5, 12.9]))
    with pytest.raises(JftError, match="general_ppl has 5 values"):
        write_general_plot(tmp_path / "bad.png", tasks, [1.0] * 5)


def _record(matrix, **overrides) -> dict:
    tasks = ["agnews", "amazon", "yahoo"]
    return {"tasks": tasks, "strategy": "sequential", "method": "lora", "matrix": matrix,
            "initial": THREE_INITIAL, "general_ppl": [12.345, 12.9, 13.4, 10.5],
            **summary(matrix, THREE_INITIAL), "seconds": 185.2,
            "trainable_params": 1234567, **overrides}


def test_compare_table_formats_each_cell_compactly():
    table = compare_table([
        ("seq", _record(THREE)),
        ("o-lora", _record(THREE[:2], strategy="o-lora", general_ppl=[12.345, 12.9],
                           seconds=3725.0, trainable_params=98304)),
        ("quick", _record(THREE, fwt=None, general_ppl=[12.345], seconds=4.3,
                          trainable_params=None)),
    ])
    lines = table.strip().splitlines()
    assert lines[0] == ("| run | strategy | method | ACC | BWT | FWT | forgetting | "
                        "general ppl (initial -> final) | time | trainable params |")
    assert len(lines) == 5
    # ACC 0.717, BWT -0.250, FWT 0.100, forgetting 0.250 (see the 3x3 test).
    assert lines[2] == ("| seq | sequential | lora | 0.717 | -0.250 | 0.100 | 0.250 | "
                        "12.35 -> 10.50 | 3 min 05 s | 1,234,567 |")
    assert lines[3] == ("| o-lora (stage 2 of 3) | o-lora | lora | 0.750 | -0.200 | 0.100 | "
                        "0.200 | 12.35 -> 12.90 | 1 h 02 min | 98,304 |")
    assert lines[4] == ("| quick | sequential | lora | 0.717 | -0.250 | – | 0.250 | "
                        "12.35 -> – | 4.3 s | – |")


def test_compare_table_refuses_runs_over_different_task_sequences():
    other = _record(THREE, tasks=["yahoo", "amazon", "agnews"])
    with pytest.raises(JftError) as error:
        compare_table([("seq", _record(THREE)), ("reversed", other)])
    message = str(error.value)
    assert "'reversed'" in message and "'seq'" in message
    assert "['yahoo', 'amazon', 'agnews']" in message and "['agnews', 'amazon', 'yahoo']" in message
