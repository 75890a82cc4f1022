"""Records: what every step did, and why.

A :class:`StepRecord` is one row of numbers on the parameters' device, so that
writing it costs no host synchronisation; ``float(rec.alpha)`` reads one.
:class:`History` keeps the rows in one preallocated ring buffer (no allocation
per step, memory bounded by ``maxlen``) with a summary, CSV export and a plot.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any, overload

import torch
from torch import Tensor

from .stepsize import DEFINED, STATUSES

#: The columns of :meth:`History.columns` and of the CSV file.
COLUMNS = ("step", "alpha_star", "alpha", "dg", "dHd", "status")
_ALPHA_STAR, _DG, _DHD, _STATUS, _GROUPS, _ALPHAS = range(6)  # positions in StepRecord.values


@dataclass(frozen=True)
class StepRecord:
    r"""One step of the line search: ``values`` holds, in order, alpha*, dᵀg, dᵀCd, the
    status code, the number of param groups and the step size used by each group.

    Attributes (0-dim tensors, views of ``values``):
        alpha_star: :math:`-d^\top g / d^\top C d` as computed (NaN, inf or negative
            when undefined; ``status`` says why).
        alpha: step size used by the first param group (all groups use the same one
            when alpha* is used); ``alphas``: one per group.
        dg: :math:`d^\top g`, summed over every parameter with a gradient.
        dHd: :math:`d^\top C d` for the chosen curvature ``C``, summed likewise.
        status: ``"ok"`` for a regular step, else why ``alpha`` differs from ``alpha_star``
            (:data:`quadstep.stepsize.STATUSES`).
    """

    step: int  #: 1-based count of ``step()`` calls
    values: Tensor

    @classmethod
    def make(
        cls, step: int, alpha_star: Tensor, alphas: Tensor, dg: Tensor, dHd: Tensor, status_code: Tensor
    ) -> StepRecord:
        """Pack the step's tensors into one row (tensor ops only: no host sync)."""
        dtype = alpha_star.dtype
        groups = torch.full_like(alpha_star, len(alphas))
        head = torch.stack([alpha_star, dg, dHd, status_code.to(dtype), groups])
        return cls(step, torch.cat([head, alphas.to(dtype)]))

    @property
    def alpha_star(self) -> Tensor:
        return self.values[_ALPHA_STAR]

    @property
    def dg(self) -> Tensor:
        return self.values[_DG]

    @property
    def dHd(self) -> Tensor:
        return self.values[_DHD]

    @property
    def status_code(self) -> Tensor:
        return self.values[_STATUS].long()

    @property
    def alphas(self) -> Tensor:
        return self.values[_ALPHAS:][: int(self.values[_GROUPS])]

    @property
    def alpha(self) -> Tensor:
        return self.values[_ALPHAS]

    @property
    def status(self) -> str:
        return STATUSES[int(self.values[_STATUS])]

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (one host sync)."""
        v = self.values.tolist()
        return dict(
            zip(COLUMNS, [self.step, v[_ALPHA_STAR], v[_ALPHAS], v[_DG], v[_DHD], STATUSES[int(v[_STATUS])]])
        )


class History(Sequence[StepRecord]):
    """The records of the last ``maxlen`` steps (all of them if ``maxlen`` is None).

    Records are appended once per step with consecutive step numbers; indexing returns
    a copy, so a record read now keeps its values after the buffer wraps around.
    """

    def __init__(self, maxlen: int | None = None) -> None:
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"Invalid history_size: {maxlen} (use a positive int, or None to keep all)")
        self._maxlen = maxlen
        self._buffer: Tensor | None = None  # [capacity, width] ring buffer, NaN-padded rows
        self._start = 0  # buffer row of the oldest record
        self._len = 0
        self._last_step = 0

    @property
    def maxlen(self) -> int | None:
        return self._maxlen

    def append(self, record: StepRecord) -> None:
        if self._len and record.step != self._last_step + 1:
            raise ValueError(f"records must have consecutive steps: {record.step} after {self._last_step}")
        row = record.values
        if self._buffer is None:
            self._buffer = row.new_full((self._maxlen or 1024, len(row)), math.nan)
        elif len(row) > self._buffer.shape[1] or (self._len == len(self._buffer) and self._maxlen is None):
            rows = self._rows()  # widen (a param group was added) or grow (unbounded history)
            capacity = len(self._buffer) * (1 if self._maxlen else 2)
            self._buffer = row.new_full((capacity, max(len(row), rows.shape[1])), math.nan)
            self._buffer[: len(rows), : rows.shape[1]] = rows
            self._start = 0
        capacity = len(self._buffer)
        if self._len == capacity:  # full and bounded: overwrite the oldest
            pos, self._start = self._start, (self._start + 1) % capacity
        else:
            pos, self._len = (self._start + self._len) % capacity, self._len + 1
        self._buffer[pos, : len(row)] = row
        if len(row) < self._buffer.shape[1]:  # fewer param groups than an earlier row
            self._buffer[pos, len(row) :] = math.nan
        self._last_step = record.step

    def clear(self) -> None:
        self._buffer, self._start, self._len = None, 0, 0

    def _rows(self) -> Tensor:
        """The records' rows, oldest first."""
        assert self._buffer is not None
        return torch.roll(self._buffer, -self._start, 0)[: self._len]

    @overload
    def __getitem__(self, index: int) -> StepRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[StepRecord]: ...
    def __getitem__(self, index: int | slice) -> StepRecord | list[StepRecord]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if not -self._len <= index < self._len:
            raise IndexError(f"history index {index} out of range ({self._len} records)")
        index %= self._len
        assert self._buffer is not None
        row = self._buffer[(self._start + index) % len(self._buffer)].clone()
        return StepRecord(self._last_step - self._len + 1 + index, row)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[StepRecord]:
        return (self[i] for i in range(self._len))

    def __repr__(self) -> str:
        return f"History({len(self)} records, maxlen={self.maxlen})"

    def columns(self) -> dict[str, list[Any]]:
        """All records as columns of Python values (one host sync for all of them)."""
        if not self._len:
            return {name: [] for name in COLUMNS}
        rows = self._rows().double().T.tolist()
        return {
            "step": list(range(self._last_step - self._len + 1, self._last_step + 1)),
            "alpha_star": rows[_ALPHA_STAR],
            "alpha": rows[_ALPHAS],
            "dg": rows[_DG],
            "dHd": rows[_DHD],
            "status": [STATUSES[int(c)] for c in rows[_STATUS]],
        }

    def summary(self) -> dict[str, Any]:
        """Max, min, mean and std of alpha* and alpha, and the count of each status.

        alpha* statistics cover the steps where alpha* exists (status ``ok`` or
        clipped); ``alpha_star_defined`` says how many those were.
        """
        cols = self.columns()
        defined = [a for a, s in zip(cols["alpha_star"], cols["status"]) if s in DEFINED]
        return {
            "steps": len(self),
            "alpha_star_defined": len(defined),
            "alpha_star": _stats(defined),
            "alpha": _stats([a for a in cols["alpha"] if math.isfinite(a)]),
            "status": dict(Counter(cols["status"])),
        }

    def format_summary(self) -> str:
        """The summary as the lines the user's notebooks printed."""
        s = self.summary()
        lines = [f"steps: {s['steps']} (alpha* defined on {s['alpha_star_defined']})"]
        for key in ("alpha_star", "alpha"):
            st = s[key]
            lines.append(
                f"{key:>10}: max {st['max']:.4g}  min {st['min']:.4g}  "
                f"mean {st['mean']:.4g}  std {st['std']:.4g}"
            )
        lines.append("    status: " + ", ".join(f"{k} {v}" for k, v in sorted(s["status"].items())))
        return "\n".join(lines)

    def to_csv(self, path: str | PathLike[str]) -> None:
        """Write one row per record with the columns :data:`COLUMNS`."""
        cols = self.columns()
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            writer.writerows(zip(*(cols[c] for c in COLUMNS)))

    def to_tensorboard(self, writer: Any, tag: str = "quadstep") -> None:
        """Send every record to a TensorBoard writer, at its step (one host sync for all of them).

        Each numeric column of :meth:`columns` becomes the scalar ``{tag}/{column}``, each
        text column (the status) the text ``{tag}/{column}`` at the steps where it changes.

        Args:
            writer: a :class:`torch.utils.tensorboard.SummaryWriter` (needs
                ``pip install tensorboard``) or anything with its ``add_scalar`` and ``add_text``.
            tag: prefix of the tags (default: "quadstep").
        """
        cols = self.columns()
        steps = cols.pop("step")
        for name, values in cols.items():
            previous = None
            for step, value in zip(steps, values):
                if not isinstance(value, str):
                    writer.add_scalar(f"{tag}/{name}", value, step)
                elif value != previous:
                    writer.add_text(f"{tag}/{name}", value, step)
                    previous = value

    def plot(self, ax: Any = None, lr: float | Sequence[float] | None = None) -> Any:
        """Plot alpha* (where defined) and alpha over steps on a log axis; returns the axes.

        ``lr``: learning rate(s) to draw as horizontal reference lines. Needs matplotlib.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ModuleNotFoundError(
                'History.plot() needs matplotlib: pip install "quadstep[plot]" (or pip install matplotlib).'
            ) from err

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        cols = self.columns()
        ok = [
            (t, a)
            for t, a, s in zip(cols["step"], cols["alpha_star"], cols["status"])
            if s in DEFINED and a > 0
        ]
        if ok:
            ax.plot(*zip(*ok), ".", ms=3, label="α*")
        ax.plot(cols["step"], cols["alpha"], lw=1, label="α used")
        for value in [lr] if isinstance(lr, (int, float)) else (lr or []):
            ax.axhline(value, ls="--", lw=0.8, color="gray")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("step size")
        ax.legend()
        return ax

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values: the records survive ``torch.save``/``torch.load`` anywhere."""
        rows = self._rows().double().tolist() if self._len else []
        return {"maxlen": self.maxlen, "last_step": self._last_step, "rows": rows}

    def load_state_dict(self, state: dict[str, Any], dtype: torch.dtype, device: torch.device) -> None:
        """Rebuild the records saved by :meth:`state_dict` as tensors of ``dtype`` on ``device``."""
        self._maxlen = state["maxlen"]
        self.clear()
        first = state["last_step"] - len(state["rows"]) + 1
        for i, row in enumerate(state["rows"]):
            values = torch.tensor(row, dtype=dtype, device=device)
            self.append(StepRecord(first + i, values[: _ALPHAS + int(row[_GROUPS])]))


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"max": math.nan, "min": math.nan, "mean": math.nan, "std": math.nan}
    x = torch.tensor(values, dtype=torch.float64)
    return {
        "max": x.max().item(),
        "min": x.min().item(),
        "mean": x.mean().item(),
        "std": x.std().item() if len(values) > 1 else 0.0,
    }
