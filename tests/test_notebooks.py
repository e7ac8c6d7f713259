"""The Colab notebooks are valid nbformat 4.5 (cell ids included) and run top to bottom
from a non-editable install, with the checkout as the working directory (as a notebook
opened there has it). Shell (`!`) and magic (`%`) lines are skipped: they install."""

from __future__ import annotations

import warnings

import pytest

from tests.isolated_install import ROOT

NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
RUNNER = """
import json, sys
cells = json.load(open(sys.argv[1]))["cells"]
namespace = {}
for cell in cells:
    if cell["cell_type"] == "code":
        lines = [line for line in "".join(cell["source"]).splitlines()
                 if not line.lstrip().startswith(("!", "%"))]
        exec(compile("\\n".join(lines), cell["id"], "exec"), namespace)
"""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_nbformat_with_cell_ids(path):
    import nbformat

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MissingIDFieldWarning: a cell without an id
        notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert (notebook.nbformat, notebook.nbformat_minor) >= (4, 5)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom_from_a_wheel_install(path, installed_wheel):
    result = installed_wheel.run(["-c", RUNNER, str(path)], cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exact match:" in result.stdout and "(1, " in result.stdout
