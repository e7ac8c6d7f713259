"""The wheel ships every module of the source tree under `jft`, and the documented commands
work from a non-editable install: from the repository root (where the checkout's `jft/`
shadows the installed one) and from another directory."""

from __future__ import annotations

import runpy
import zipfile

from tests.isolated_install import ROOT, source_files

FOLDERS = {"jft": "jft", **runpy.run_path(str(ROOT / "jft" / "_checkout.py"))["SIBLING_PACKAGES"]}
SUBPACKAGES_SCRIPT = """
import importlib, pkgutil, sys
import jft
names = ["jft"] + [m.name for m in pkgutil.walk_packages(jft.__path__, "jft.") if m.ispkg]
for name in names + ["jft.models", "jft.sharding", "jft.pallas_kernels", "jft.peft"]:
    importlib.import_module(name)
assert not any("editable" in type(f).__module__ for f in sys.meta_path), sys.meta_path
print(jft.__file__)
print(*sorted(set(names) | {"jft.models", "jft.sharding", "jft.pallas_kernels"}))
"""


def _packaged_name(source: str) -> str | None:
    """Where a source file lands in the wheel (None: not part of the package)."""
    top, _, rest = source.partition("/")
    for package, folder in FOLDERS.items():
        if top == folder and rest:
            return package.replace(".", "/") + "/" + rest
    return None


def test_wheel_holds_every_source_module_and_nothing_else(installed_wheel):
    names = set(zipfile.ZipFile(installed_wheel.wheel).namelist())
    expected = {_packaged_name(f) for f in source_files() if f.endswith(".py")} - {None}
    assert {"jft/peft/lora.py", "jft/models/transformer.py", "jft/sharding/logical.py",
            "jft/pallas_kernels/lora_linear.py"} <= expected
    assert expected - names == set()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"jft", next(n for n in top_level if n.endswith(".dist-info"))}


def test_commands_run_from_the_repository_root(installed_wheel):
    for module in ("jft.train", "jft.generate", "jft.export", "jft.serve"):
        result = installed_wheel.run(["-m", module, "--help"], cwd=ROOT)
        assert result.returncode == 0, result.stderr
        assert f"python -m {module}" in result.stdout
    result = installed_wheel.run(["-c", SUBPACKAGES_SCRIPT], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    where, packages = result.stdout.splitlines()
    assert where == str(ROOT / "jft" / "__init__.py")  # the checkout's jft, mapped
    assert {"jft.peft", "jft.models", "jft.sharding", "jft.pallas_kernels"} <= set(
        packages.split())


def test_commands_run_from_another_directory(installed_wheel, tmp_path):
    for module in ("jft.train", "jft.generate", "jft.export", "jft.serve"):
        result = installed_wheel.run(["-m", module, "--help"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    result = installed_wheel.run(["-c", SUBPACKAGES_SCRIPT], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    where = result.stdout.splitlines()[0]
    assert where == str(installed_wheel.target / "jft" / "__init__.py")
