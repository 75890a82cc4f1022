"""README.md is the front door: its commands are the ones CI runs, and its example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quadstep.stepsize import RECORD_STATUSES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    ci_commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert len(ci_commands) == 1
    assert ci_commands[0] in README
    assert ci_commands[0].endswith("-m pytest")


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    example = next(b for b in blocks if "QuadraticLineSearchAdam(" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    history = namespace["opt"].history
    assert len(history) == 100
    assert (tmp_path / "alpha.csv").read_text().count("\n") == 101


def test_readme_step_probe_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    example = next(b for b in blocks if "StepProbe(" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    history = namespace["probe"].history
    assert len(history) == 100 and history.summary()["alpha_star_defined"] >= 90
    assert "steps: 100" in capsys.readouterr().out


def test_readme_exact_curvature_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The *Exact curvature* snippet runs as written: imports, model, data and loop included."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    (example,) = [b for b in blocks if 'curvature="ggn-exact"' in b and "StepProbe" not in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    history = namespace["opt"].history
    assert len(history) == 256 // 32
    columns = history.columns()
    assert all(v > 0 for v in columns["lagged_dHd"][1:])  # a GGN along a nonzero d_{t-1}, from step 2
    assert all(s in RECORD_STATUSES for s in columns["status"] + columns["policy_status"])
