"""How a task's generations are scored: `exact_match` (the default) or `rouge_l`."""

from __future__ import annotations

import re

from jft.errors import JftError
from jft.training.data import exact_match


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004) over lowercased alphanumeric words, as the `rouge_score`
    package tokenises without stemming: P = LCS / |generated|, R = LCS / |reference|,
    F = 2PR / (P + R); 0 when either side has no words."""
    pred, ref = _words(generated), _words(reference)
    if not pred or not ref:
        return 0.0
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(metric: str, generated: str, reference: str) -> float:
    if metric == "exact_match":
        return float(exact_match(generated, reference))
    if metric == "rouge_l":
        return rouge_l(generated, reference)
    raise JftError(f"unknown metric {metric!r}; valid: exact_match, rouge_l")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], previous + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]
