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

from .stepsize import DEFINED, RECORD_STATUSES

#: The columns of :meth:`History.columns` and of the CSV file, before those of the policies.
COLUMNS = (
    "step",
    "alpha_star",
    "alpha",
    "dg",
    "dHd",
    "status",
    "policy_status",
    "measured",
    "slope",
    "lagged_dHd",
)
#: Per policy ``name``: its proposal, numerator and denominator (columns ``name.alpha`` ...).
POLICY_FIELDS = ("alpha", "numerator", "denominator")
#: Positions in StepRecord.values; the policies' triples follow, then one alpha per param group.
_ALPHA_STAR, _DG, _DHD, _STATUS, _POLICY_STATUS, _MEASURED, _SLOPE, _LAGGED, _GROUPS, _POLICIES = range(10)
_HEAD = 10


@dataclass(frozen=True)
class StepRecord:
    r"""One step: ``values`` holds alpha*, dᵀg, dᵀCd, the two status codes, whether the curvature
    was measured, the lagged slope and curvature, the number of param groups and of policies, each
    policy's (alpha, numerator, denominator), then the step size used by each group.

    Attributes (0-dim tensors, views of ``values``):
        alpha_star: :math:`-d^\top g / d^\top C d` of the current batch along the current
            direction, as computed (NaN, inf or negative when undefined; ``status`` says why).
        alpha: step size used by the first param group; ``alphas``: one per group.
        dg: :math:`d^\top g`, summed over every parameter with a gradient.
        dHd: :math:`d^\top C d` for the chosen curvature ``C`` (NaN when not measured).
        status: whether alpha* exists and was clipped, or why not
            (:data:`quadstep.stepsize.RECORD_STATUSES`).
        policy_status: why the step-size policy's alpha is what it is.
        measured: 1 when the curvature was queried on this step, else 0.
        slope, lagged_dHd: :math:`s_t = d_{t-1}^\top g_t`, :math:`q_t = d_{t-1}^\top C_t d_{t-1}`
            along the previous direction (NaN when not measured).
        proposals: ``{name: (alpha, numerator, denominator)}`` of each policy the step ran.
    """

    step: int  #: 1-based count of ``step()`` calls
    values: Tensor
    policies: tuple[str, ...] = ()  #: the names of the policies whose triples ``values`` holds

    @classmethod
    def make(
        cls,
        step: int,
        alpha_star: Tensor,
        alphas: Tensor,
        dg: Tensor,
        dHd: Tensor,
        status_code: Tensor,
        *,
        policy_status: Tensor | None = None,
        measured: bool = True,
        slope: Tensor | None = None,
        lagged_dHd: Tensor | None = None,
        proposals: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
    ) -> StepRecord:
        """Pack the step's tensors into one row (tensor ops only: no host sync)."""
        dtype = alpha_star.dtype
        nan = torch.full_like(alpha_star, math.nan)
        proposals = proposals or {}
        head = [
            alpha_star,
            dg,
            dHd,
            status_code,
            status_code if policy_status is None else policy_status,
            torch.full_like(alpha_star, float(measured)),
            nan if slope is None else slope,
            nan if lagged_dHd is None else lagged_dHd,
            torch.full_like(alpha_star, len(alphas)),
            torch.full_like(alpha_star, len(proposals)),
        ]
        head += [v for triple in proposals.values() for v in triple]
        head = [v if v.dtype == dtype else v.to(dtype) for v in head]
        return cls(
            step,
            torch.cat([torch.stack(head), alphas if alphas.dtype == dtype else alphas.to(dtype)]),
            tuple(proposals),
        )

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
    def slope(self) -> Tensor:
        return self.values[_SLOPE]

    @property
    def lagged_dHd(self) -> Tensor:
        return self.values[_LAGGED]

    @property
    def measured(self) -> bool:
        return bool(self.values[_MEASURED])

    @property
    def status_code(self) -> Tensor:
        return self.values[_STATUS].long()

    @property
    def _alphas_at(self) -> int:
        return _HEAD + 3 * int(self.values[_POLICIES])

    @property
    def alphas(self) -> Tensor:
        return self.values[self._alphas_at :][: int(self.values[_GROUPS])]

    @property
    def alpha(self) -> Tensor:
        return self.values[self._alphas_at]

    @property
    def status(self) -> str:
        return RECORD_STATUSES[int(self.values[_STATUS])]

    @property
    def policy_status(self) -> str:
        return RECORD_STATUSES[int(self.values[_POLICY_STATUS])]

    @property
    def proposals(self) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        triples = self.values[_HEAD : self._alphas_at].reshape(-1, 3)
        return {name: tuple(row.unbind()) for name, row in zip(self.policies, triples)}  # type: ignore[misc]

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (one host sync): :data:`COLUMNS`, then ``name.alpha`` ... per policy."""
        return _row_dict(self.step, self.values.tolist(), self.policies)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}" if isinstance(v, str) else f"{k}={v:.6g}" for k, v in self.as_dict().items()
        )
        return f"StepRecord({fields})"


def _row_dict(step: int, v: list[float], policies: Sequence[str]) -> dict[str, Any]:
    """One record's values as a dict of plain Python values, keyed by column (every NaN is the one
    object ``math.nan``, so that records compare equal with ``==`` where their values are the same)."""
    v = [math.nan if x != x else x for x in v]
    at = _HEAD + 3 * int(v[_POLICIES])
    row: dict[str, Any] = {
        "step": step,
        "alpha_star": v[_ALPHA_STAR],
        "alpha": v[at],
        "dg": v[_DG],
        "dHd": v[_DHD],
        "status": RECORD_STATUSES[int(v[_STATUS])],
        "policy_status": RECORD_STATUSES[int(v[_POLICY_STATUS])],
        "measured": int(v[_MEASURED]),
        "slope": v[_SLOPE],
        "lagged_dHd": v[_LAGGED],
    }
    for i, name in enumerate(policies[: int(v[_POLICIES])]):
        for j, field in enumerate(POLICY_FIELDS):
            row[f"{name}.{field}"] = v[_HEAD + 3 * i + j]
    return row


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
        self._policies: tuple[str, ...] = ()  # the names of the policies every record holds

    @property
    def maxlen(self) -> int | None:
        return self._maxlen

    def append(self, record: StepRecord) -> None:
        if self._len and record.step != self._last_step + 1:
            raise ValueError(f"records must have consecutive steps: {record.step} after {self._last_step}")
        if self._len and record.policies != self._policies:
            raise ValueError(f"records must hold the same policies: {record.policies} after {self._policies}")
        self._policies = record.policies
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
        self._buffer, self._start, self._len, self._policies = None, 0, 0, ()

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
        return StepRecord(self._last_step - self._len + 1 + index, row, self._policies)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[StepRecord]:
        return (self[i] for i in range(self._len))

    def __repr__(self) -> str:
        return f"History({len(self)} records, maxlen={self.maxlen})"

    def column_names(self) -> tuple[str, ...]:
        """:data:`COLUMNS`, then ``name.alpha``, ``name.numerator``, ``name.denominator`` per policy."""
        return COLUMNS + tuple(f"{n}.{f}" for n in self._policies for f in POLICY_FIELDS)

    def columns(self) -> dict[str, list[Any]]:
        """All records as columns of Python values (one host sync for all of them)."""
        if not self._len:
            return {name: [] for name in self.column_names()}
        first = self._last_step - self._len + 1
        rows = [_row_dict(first + i, r, self._policies) for i, r in enumerate(self._rows().double().tolist())]
        return {name: [r[name] for r in rows] for name in self.column_names()}

    def summary(self) -> dict[str, Any]:
        """Max, min, mean and std of alpha* and alpha, and the count of each status and policy status.

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
            "policy_status": dict(Counter(cols["policy_status"])),
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
        lines.append("    policy: " + ", ".join(f"{k} {v}" for k, v in sorted(s["policy_status"].items())))
        return "\n".join(lines)

    def to_csv(self, path: str | PathLike[str]) -> None:
        """Write one row per record with the columns of :meth:`column_names`."""
        cols = self.columns()
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(cols)
            writer.writerows(zip(*cols.values()))

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
        return {"maxlen": self.maxlen, "last_step": self._last_step, "rows": rows, "policies": self._policies}

    def load_state_dict(self, state: dict[str, Any], dtype: torch.dtype, device: torch.device) -> None:
        """Rebuild the records saved by :meth:`state_dict` as tensors of ``dtype`` on ``device``."""
        self._maxlen = state["maxlen"]
        self.clear()
        first = state["last_step"] - len(state["rows"]) + 1
        for i, row in enumerate(state["rows"]):
            if "policies" not in state:  # an older row: alpha*, dg, dHd, status, groups, alphas
                row = [*row[:4], row[3], 1.0, math.nan, math.nan, row[4], 0.0, *row[5:]]
            values = torch.tensor(row, dtype=dtype, device=device)
            width = _HEAD + 3 * int(row[_POLICIES]) + int(row[_GROUPS])
            self.append(StepRecord(first + i, values[:width], tuple(state.get("policies", ()))))


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
