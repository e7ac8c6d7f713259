"""jft built as a wheel and installed non-editable where the editable install is not seen.

The wheel goes into a `--target` folder. Processes run with `python -S` (no `site`, so no
`.pth` file: the editable install's finder never loads) and PYTHONPATH = that folder,
then this interpreter's site-packages for jft's dependencies.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_files() -> list[str]:
    """The checkout's files as a fresh clone has them (tracked, plus untracked ones git
    does not ignore), relative to the repository root."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return [name for name in listed.stdout.split("\n") if name and (ROOT / name).is_file()]
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not {".git", "build", "runs"} & set(p.parts)]


@dataclass
class InstalledWheel:
    wheel: Path
    target: Path

    def run(self, args: list[str], cwd: Path, timeout: float = 600
            ) -> subprocess.CompletedProcess:
        path = [str(self.target), *site.getsitepackages()]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}
        return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, text=True,
                              capture_output=True, timeout=timeout)


def build_and_install(workdir: Path) -> InstalledWheel:
    source = workdir / "src"
    for name in source_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(workdir)],
        cwd=source, check=True, capture_output=True,
    )
    (wheel,) = workdir.glob("jft-*.whl")
    target = workdir / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    return InstalledWheel(wheel, target)
