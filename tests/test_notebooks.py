"""The Colab notebooks run top to bottom (shell and magic lines skipped)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "colab").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_cells_run(path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # notebooks run from the repo root
    cells = json.loads(path.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        lines = [line for line in source.splitlines() if not line.lstrip().startswith(("!", "%"))]
        exec(compile("\n".join(lines), f"{path.name}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "exact match:" in out and "(1, " in out
