"""History's exports beyond CSV: TensorBoard (a fake writer), and plot()'s error without matplotlib."""

from __future__ import annotations

import sys

import pytest
import torch

from quadstep.records import History, StepRecord
from quadstep.stepsize import STATUS_CODE


class FakeWriter:
    """Records what a ``SummaryWriter`` would be sent."""

    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.texts: dict[str, list[tuple[int, str]]] = {}

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.setdefault(tag, []).append((global_step, value))

    def add_text(self, tag: str, text: str, global_step: int) -> None:
        self.texts.setdefault(tag, []).append((global_step, text))


def _history() -> History:
    history = History(maxlen=4)  # wraps: steps 3 to 6 remain
    statuses = ["ok", "ok", "clipped-max", "clipped-max", "non-positive-curvature", "ok"]
    t = torch.tensor
    for step, status in enumerate(statuses, start=1):
        alpha_star = -1.0 if status == "non-positive-curvature" else 0.05 * step
        history.append(
            StepRecord.make(step, t(alpha_star), t([0.01 * step]), t(-2.0 * step), t(3.0 * step),
                            t(STATUS_CODE[status]))
        )  # fmt: skip
    return history


def test_to_tensorboard_sends_every_record_at_its_step() -> None:
    history = _history()
    writer = FakeWriter()
    history.to_tensorboard(writer, tag="run")
    steps = [3, 4, 5, 6]
    expected = {
        "run/alpha_star": [0.15, 0.2, -1.0, 0.3],
        "run/alpha": [0.01 * s for s in steps],
        "run/dg": [-2.0 * s for s in steps],
        "run/dHd": [3.0 * s for s in steps],
    }
    for tag, values in expected.items():
        assert [s for s, _ in writer.scalars[tag]] == steps
        assert [v for _, v in writer.scalars[tag]] == pytest.approx(values)
    changes = [(3, "clipped-max"), (5, "non-positive-curvature"), (6, "ok")]
    assert writer.texts == {"run/status": changes, "run/policy_status": changes}
    assert "run/step" not in writer.scalars


def test_to_tensorboard_sends_any_column(monkeypatch: pytest.MonkeyPatch) -> None:
    """Written over columns(): a column added there reaches the writer without changing to_tensorboard."""
    history = _history()
    columns = History.columns

    def with_extra(self: History) -> dict:
        cols = columns(self)
        return {**cols, "extra": [float(s) ** 2 for s in cols["step"]], "note": ["a", "a", "b", "b"]}

    monkeypatch.setattr(History, "columns", with_extra)
    writer = FakeWriter()
    history.to_tensorboard(writer)
    assert writer.scalars["quadstep/extra"] == [(3, 9.0), (4, 16.0), (5, 25.0), (6, 36.0)]
    assert writer.texts["quadstep/note"] == [(3, "a"), (5, "b")]


def test_to_tensorboard_of_an_empty_history_sends_nothing() -> None:
    writer = FakeWriter()
    History().to_tensorboard(writer)
    assert writer.scalars == {} and writer.texts == {}


def test_to_tensorboard_with_summary_writer(tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path) as writer:
        _history().to_tensorboard(writer)
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when absent
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "quadstep\[plot\]"'):
        _history().plot()
