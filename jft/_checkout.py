"""Importing jft from a checkout, where three of its subpackages sit beside `jft/`.

The repository keeps `models/`, `sharding/` and `pallas_kernels/` at the top, as our users
asked; the wheel installs them as `jft.models`, `jft.sharding` and `jft.pallas_kernels`
(setup.py reads `SIBLING_PACKAGES` from here, so the mapping is stated once).

Python run from the repository root (`python -m jft.train`, a notebook opened there)
imports `jft` from the checkout rather than from site-packages, because the working
directory comes first on `sys.path`. That `jft/` has no `models/` inside it, so a finder
maps the three names onto the checkout's own folders. Extending `jft.__path__` with the
repository root would do the same, but would also make `jft.tests`, `jft.benchmarks` and
every other top-level folder importable; the finder maps exactly these three.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

SIBLING_PACKAGES = {
    "jft.models": "models",
    "jft.sharding": "sharding",
    "jft.pallas_kernels": "pallas_kernels",
}


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds `jft.models` and its siblings in the checkout at `root`."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        folder = SIBLING_PACKAGES.get(fullname)
        if folder is None:
            return None
        init = self.root / folder / "__init__.py"
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)])


def map_sibling_packages(package_dir: str) -> None:
    """Installs the finder when `package_dir` (jft's own folder) is a checkout's `jft/`:
    an installed jft holds its subpackages inside it and needs nothing."""
    package_dir = Path(package_dir)
    root = package_dir.parent
    if (package_dir / "models").is_dir() or not all(
            (root / folder / "__init__.py").is_file() for folder in SIBLING_PACKAGES.values()):
        return
    if not any(isinstance(f, CheckoutFinder) and f.root == root for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutFinder(root))
