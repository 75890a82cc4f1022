"""What a user installing the package gets: the wheel's files and metadata."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel built from a copy of the sources (the build writes next to them)."""
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "quadstep", src / "quadstep", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out)],
        check=True,
    )
    (path,) = out.glob("quadstep-*.whl")
    return zipfile.ZipFile(path)


def _metadata(wheel: zipfile.ZipFile):  # noqa: ANN202
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return Parser().parsestr(wheel.read(name).decode())


@pytest.mark.slow
def test_wheel_ships_py_typed_and_the_mit_license(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert "quadstep/py.typed" in names
    (license_file,) = [n for n in names if n.endswith("/LICENSE")]
    assert wheel.read(license_file).decode().startswith("MIT License")
    assert _metadata(wheel)["License"] == "MIT"


@pytest.mark.slow
def test_declared_torch_floor_is_the_tested_version(wheel: zipfile.ZipFile) -> None:
    """The floor declared is the torch that CI installs (the README's set-up pins it): widening it
    needs a test run on the older torch."""
    requirements = [Requirement(r) for r in _metadata(wheel).get_all("Requires-Dist")]
    (torch_req,) = [r for r in requirements if r.name == "torch"]
    (floor,) = [Version(s.version) for s in torch_req.specifier if s.operator == ">="]
    ci_pins = re.findall(r"pip install torch==([0-9.]+)", (ROOT / ".ci" / "run").read_text())
    assert ci_pins and {Version(v) for v in ci_pins} == {floor}
    assert Version(torch.__version__.split("+")[0]) in torch_req.specifier
