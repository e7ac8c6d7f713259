"""The wheel's packages: `jft/` plus the top-level folders it installs under `jft`
(`models/` as `jft.models`, ...), each with every subpackage found in it, so a new
subpackage cannot be left out. The metadata is in pyproject.toml."""

import runpy
from pathlib import Path

from setuptools import find_packages, setup

SIBLINGS = runpy.run_path(str(Path(__file__).parent / "jft" / "_checkout.py"))["SIBLING_PACKAGES"]
FOLDERS = {"jft": "jft", **SIBLINGS}

setup(
    package_dir=FOLDERS,
    packages=[f"{name}.{sub}" if sub else name
              for name, folder in FOLDERS.items()
              for sub in ["", *find_packages(Path(__file__).parent / folder)]],
)
