"""History: summary statistics against the statistics module, CSV export, bounded memory."""

from __future__ import annotations

import csv
import math
import statistics

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from quadstep import QuadraticLineSearchAdam, StepRecord
from quadstep.records import COLUMNS, History
from quadstep.stepsize import STATUS_CODE


def record(step: int, alpha_star: float, status: str, alpha: float = 0.1) -> StepRecord:
    t = torch.tensor
    return StepRecord.make(step, t(alpha_star), t([alpha]), t(-1.0), t(2.0), t(STATUS_CODE[status]))


def test_summary_matches_statistics_module_over_defined_alpha_star() -> None:
    values = [(0.5, "ok"), (2.0, "clipped-max"), (-3.0, "non-positive-curvature"), (0.25, "ok"), (1e-4, "clipped-min")]
    history = History()
    for i, (a, s) in enumerate(values, start=1):
        history.append(record(i, a, s, alpha=0.1 * i))
    summary = history.summary()
    defined = [0.5, 2.0, 0.25, 1e-4]
    assert summary["steps"] == 5 and summary["alpha_star_defined"] == 4
    assert summary["alpha_star"]["max"] == pytest.approx(max(defined))
    assert summary["alpha_star"]["min"] == pytest.approx(min(defined))
    assert summary["alpha_star"]["mean"] == pytest.approx(statistics.mean(defined))
    assert summary["alpha_star"]["std"] == pytest.approx(statistics.stdev(defined), rel=1e-6)
    assert summary["alpha"]["max"] == pytest.approx(0.5)
    assert summary["status"] == {"ok": 2, "clipped-max": 1, "non-positive-curvature": 1, "clipped-min": 1}
    text = history.format_summary()
    assert "max 2" in text and "non-positive-curvature 1" in text


def test_empty_history_summary_is_nan_not_an_error() -> None:
    summary = History().summary()
    assert summary["steps"] == 0 and math.isnan(summary["alpha_star"]["max"])


def test_bounded_history_keeps_the_last_records() -> None:
    history = History(maxlen=3)
    for i in range(1, 11):
        history.append(record(i, 0.1, "ok"))
    assert len(history) == 3 and [r.step for r in history] == [8, 9, 10]
    assert history[-1].step == 10 and [r.step for r in history[:2]] == [8, 9]


def test_csv_export_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    model, loss_fn = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))), extend(nn.MSELoss())
    opt = QuadraticLineSearchAdam(model.parameters(), step_size="greedy", history_size=4)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    for _ in range(6):
        opt.zero_grad()
        with backpack(opt.extension()):
            loss_fn(model(x), y).backward()
        opt.step()
    path = tmp_path / "history.csv"
    opt.history.to_csv(path)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == opt.history.column_names()
    assert opt.history.column_names()[: len(COLUMNS)] == COLUMNS
    assert [int(r["step"]) for r in rows] == [3, 4, 5, 6]
    for row, rec in zip(rows, opt.history):
        assert float(row["alpha_star"]) == pytest.approx(float(rec.alpha_star))
        assert float(row["dHd"]) == pytest.approx(float(rec.dHd))
        assert row["status"] == rec.status
        assert rec.as_dict()["alpha"] == pytest.approx(float(row["alpha"]))


def test_plot_draws_alpha_star_and_reference_lr() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    history = History()
    for i in range(1, 6):
        history.append(record(i, 0.1 * i, "ok"))
    ax = history.plot(lr=1e-3)
    ydata = [list(line.get_ydata()) for line in ax.get_lines()]
    assert ydata[0] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert [1e-3, 1e-3] in ydata


def test_ring_buffer_wraps_grows_and_records_read_earlier_keep_their_values() -> None:
    bounded, unbounded = History(maxlen=5), History()
    held = None
    for i in range(1, 2501):
        for h in (bounded, unbounded):
            h.append(record(i, float(i), "ok", alpha=0.5 * i))
        if i == 3:
            held = bounded[-1]
    assert held is not None and held.step == 3 and float(held.alpha_star) == 3.0
    assert [r.step for r in bounded] == [2496, 2497, 2498, 2499, 2500]
    assert [float(r.alpha) for r in bounded] == [1248.0, 1248.5, 1249.0, 1249.5, 1250.0]
    assert len(unbounded) == 2500  # past the initial capacity of 1024
    assert unbounded.columns()["alpha_star"] == [float(i) for i in range(1, 2501)]
    assert unbounded[1023].step == 1024 and float(unbounded[-1].alpha_star) == 2500.0
    with pytest.raises(IndexError):
        bounded[5]
    with pytest.raises(ValueError, match="consecutive steps"):
        bounded.append(record(7, 1.0, "ok"))


def test_added_param_group_widens_records() -> None:
    history = History(maxlen=3)
    history.append(record(1, 0.1, "ok"))
    t = torch.tensor
    history.append(StepRecord.make(2, t(0.2), t([0.3, 0.4]), t(-1.0), t(2.0), t(STATUS_CODE["ok"])))
    assert history[0].alphas.tolist() == pytest.approx([0.1])
    assert history[1].alphas.tolist() == pytest.approx([0.3, 0.4])
    state = history.state_dict()
    restored = History()
    restored.load_state_dict(state, torch.float32, torch.device("cpu"))
    assert [r.as_dict() for r in restored] == [r.as_dict() for r in history]
    assert restored.maxlen == 3 and restored[1].alphas.tolist() == pytest.approx([0.3, 0.4])
