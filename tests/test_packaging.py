"""The wheel installs jft, jft.models, jft.sharding and jft.pallas_kernels, nothing else."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_folders_under_the_jft_namespace(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    files = tracked.stdout.split() if tracked.returncode == 0 else []
    if not files:  # not a git checkout: copy the source folders
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if "tests" not in p.parts]
        files += ["pyproject.toml", "README.md"]
    source = tmp_path / "src"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=source, check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("jft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("jft/__init__.py", "jft/generate.py", "jft/models/transformer.py",
                   "jft/models/gemma3.py", "jft/sharding/logical.py",
                   "jft/pallas_kernels/__init__.py"):
        assert module in names, module
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"jft", next(n for n in top_level if n.endswith(".dist-info"))}
