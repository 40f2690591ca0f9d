"""The built wheel contains every dpkd subpackage listed in pyproject.toml, each with __init__.py and
py.typed, and every package folder of the source tree is listed (an unlisted one imports under
``pip install -e .`` but is silently missing from the wheel)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGES = SETUPTOOLS["packages"]
PACKAGE_DIR = SETUPTOOLS["package-dir"]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    # build from a copy so that build/ and *.egg-info never appear in the working tree
    src = tmp_path_factory.mktemp("src")
    for name in ["pyproject.toml", "README.md", "LICENSE", *PACKAGE_DIR.values()]:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.exists():
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("dpkd-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


@pytest.mark.parametrize("package", PACKAGES)
def test_wheel_has_package_with_init_and_py_typed(wheel_names, package):
    folder = package.replace(".", "/")
    assert f"{folder}/__init__.py" in wheel_names, f"{package}: no __init__.py in the wheel"
    assert f"{folder}/py.typed" in wheel_names, f"{package}: no py.typed in the wheel"


def _source_packages():
    for prefix, folder in PACKAGE_DIR.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            yield ".".join([prefix, *rel.parts])


def test_every_source_package_is_listed_in_pyproject():
    missing = sorted(set(_source_packages()) - set(PACKAGES))
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
