"""Records: what every step did, and why.

A :class:`StepRecord` keeps its numbers as 0-dim tensors on the parameters'
device, so that writing it costs no host synchronisation; ``float(rec.alpha)``
reads one. :class:`History` is a bounded sequence of records with a summary,
CSV export and a plot.
"""

from __future__ import annotations

import csv
import math
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any, overload

import torch
from torch import Tensor

from .stepsize import STATUS_CODE, STATUSES

#: The columns of :meth:`History.columns` and of the CSV file.
COLUMNS = ("step", "alpha_star", "alpha", "dg", "dHd", "status")


@dataclass(frozen=True)
class StepRecord:
    r"""One step of the line search.

    Attributes:
        step: 1-based count of ``step()`` calls.
        alpha_star: :math:`-d^\top g / d^\top C d` as computed (NaN, inf or negative
            when undefined; ``status`` says why).
        alphas: step size used by each param group (1-D tensor).
        dg: :math:`d^\top g`, summed over every parameter with a gradient.
        dHd: :math:`d^\top C d` for the chosen curvature ``C``, summed likewise.
        status_code: index into :data:`quadstep.stepsize.STATUSES`.
    """

    step: int
    alpha_star: Tensor
    alphas: Tensor
    dg: Tensor
    dHd: Tensor
    status_code: Tensor

    @property
    def alpha(self) -> Tensor:
        """Step size used by the first param group (all groups agree when alpha* is used)."""
        return self.alphas[0]

    @property
    def status(self) -> str:
        """``"ok"`` for a regular step, else why ``alpha`` differs from ``alpha_star``."""
        return STATUSES[int(self.status_code)]

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values, one host sync."""
        values = torch.stack(
            [self.alpha_star, self.alpha, self.dg, self.dHd]
        ).tolist()
        return dict(zip(COLUMNS, [self.step, *values, self.status]))


class History(Sequence[StepRecord]):
    """The records of the last ``maxlen`` steps (all of them if ``maxlen`` is None)."""

    def __init__(self, maxlen: int | None = None) -> None:
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"Invalid history_size: {maxlen} (use a positive int, or None to keep all)")
        self._records: deque[StepRecord] = deque(maxlen=maxlen)

    @property
    def maxlen(self) -> int | None:
        return self._records.maxlen

    def append(self, record: StepRecord) -> None:
        self._records.append(record)

    def clear(self) -> None:
        self._records.clear()

    @overload
    def __getitem__(self, index: int) -> StepRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[StepRecord]: ...
    def __getitem__(self, index: int | slice) -> StepRecord | list[StepRecord]:
        if isinstance(index, slice):
            return list(self._records)[index]
        return self._records[index]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self._records)

    def __repr__(self) -> str:
        return f"History({len(self)} records, maxlen={self.maxlen})"

    def columns(self) -> dict[str, list[Any]]:
        """All records as columns of Python values (one host sync for all of them)."""
        recs = list(self._records)
        if not recs:
            return {name: [] for name in COLUMNS}
        numbers = torch.stack(
            [
                torch.stack([getattr(r, name).double() for r in recs])
                for name in ("alpha_star", "alpha", "dg", "dHd", "status_code")
            ]
        ).tolist()
        return {
            "step": [r.step for r in recs],
            "alpha_star": numbers[0],
            "alpha": numbers[1],
            "dg": numbers[2],
            "dHd": numbers[3],
            "status": [STATUSES[int(c)] for c in numbers[4]],
        }

    def summary(self) -> dict[str, Any]:
        """Max, min, mean and std of alpha* and alpha, and the count of each status.

        alpha* statistics cover the steps where alpha* exists (status ``ok`` or
        clipped); ``alpha_star_defined`` says how many those were.
        """
        cols = self.columns()
        defined = [
            a for a, s in zip(cols["alpha_star"], cols["status"]) if s in ("ok", "clipped-max", "clipped-min")
        ]
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

    def plot(self, ax: Any = None, lr: float | Sequence[float] | None = None) -> Any:
        """Plot alpha* (where defined) and alpha over steps on a log axis; returns the axes.

        ``lr``: learning rate(s) to draw as horizontal reference lines. Needs matplotlib.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        cols = self.columns()
        ok = [
            (t, a)
            for t, a, s in zip(cols["step"], cols["alpha_star"], cols["status"])
            if s in ("ok", "clipped-max", "clipped-min") and a > 0
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
        recs = list(self._records)
        alphas = torch.cat([r.alphas.double() for r in recs]).tolist() if recs else []
        return {
            "maxlen": self.maxlen,
            "columns": self.columns(),
            "alphas": alphas,
            "groups": [len(r.alphas) for r in recs],
        }

    def load_state_dict(self, state: dict[str, Any], dtype: torch.dtype, device: torch.device) -> None:
        """Rebuild the records saved by :meth:`state_dict` as tensors of ``dtype`` on ``device``."""
        self._records = deque(maxlen=state["maxlen"])
        cols = state["columns"]
        alphas = iter(state["alphas"])

        def t(x: Any, dt: torch.dtype = dtype) -> Tensor:
            return torch.tensor(x, dtype=dt, device=device)

        for i, step in enumerate(cols["step"]):
            self._records.append(
                StepRecord(
                    step=step,
                    alpha_star=t(cols["alpha_star"][i]),
                    alphas=t([next(alphas) for _ in range(state["groups"][i])]),
                    dg=t(cols["dg"][i]),
                    dHd=t(cols["dHd"][i]),
                    status_code=t(STATUS_CODE[cols["status"][i]], torch.int64),
                )
            )


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
