"""Runs every (workload, submission, seed) and writes results.csv, per-step logs and metadata.json."""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from quadstep.records import COLUMNS as RECORD_COLUMNS
from quadstep.records import POLICY_FIELDS
from quadstep.stepsize import POLICIES as POLICY_NAMES

from . import report
from .submissions import BASELINE, DEFAULT_LR, POLICIES, Submission, observe_submissions, submissions
from .training import fit, minibatches
from .workloads import Data, DataUnavailable, Workload

log = logging.getLogger("benchmarks")

#: Columns of results.csv, one row per workload × submission × seed.
RESULT_COLUMNS = (
    "workload",
    "optimizer",
    "label",
    "lr",
    "curvature",
    "mode",
    "step_size",
    "every",
    "seed",
    "steps",
    "status",
    "initial_train_loss",
    "final_train_loss",
    "test_loss",
    "test_accuracy",
    "seconds_per_step",
    "alpha_star_median",
    "alpha_median",
    "alpha_star_defined",
    "run_id",
    "error",
)
#: Columns of logs/<workload>.csv, one row per step of every run (record columns: quadstep runs only):
#: the loss, then quadstep's record columns and each built-in policy's.
LOG_COLUMNS = (
    "run_id",
    "step",
    "loss",
    *RECORD_COLUMNS[1:],
    *(f"{name}.{field}" for name in POLICY_NAMES for field in POLICY_FIELDS),
)
#: A run whose final training loss exceeds its initial one by this factor has diverged.
DIVERGENCE_FACTOR = 10.0
#: Training-set examples on which the final training loss is evaluated.
TRAIN_EVAL_SIZE = 10_000
EVAL_CHUNK = 2_000

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunResult:
    """What one run produced: its results.csv row and its per-step log rows."""

    row: dict[str, Any]
    log: list[dict[str, Any]] = field(default_factory=list)


def make_loss(name: str) -> nn.Module:
    if name == "mse":
        return nn.MSELoss()
    if name == "cross_entropy":
        return nn.CrossEntropyLoss()
    raise ValueError(f"Unknown loss {name!r} (use 'mse' or 'cross_entropy')")


@torch.no_grad()
def evaluate(model: nn.Module, loss: str, x: Tensor, y: Tensor) -> tuple[float, float | None]:
    """Mean loss over ``(x, y)`` and, for cross-entropy, the accuracy."""
    total, correct = 0.0, 0
    for start in range(0, len(x), EVAL_CHUNK):
        out = model(x[start : start + EVAL_CHUNK])
        target = y[start : start + EVAL_CHUNK]
        if loss == "mse":
            total += float(F.mse_loss(out, target, reduction="sum"))
        else:
            total += float(F.cross_entropy(out, target, reduction="sum"))
            correct += int((out.argmax(1) == target).sum())
    if loss == "mse":
        return total / y.numel(), None
    return total / len(y), correct / len(y)


def train_run(workload: Workload, data: Data, sub: Submission, seed: int, steps: int) -> RunResult:
    """Train a fresh model (seeded with ``seed``) for ``steps`` steps of ``sub``; evaluate it.

    Never raises for a diverging run: a non-finite loss stops it with status ``diverged``.
    """
    row = _identity(workload, sub, seed)
    run_id = row["run_id"]
    torch.manual_seed(seed)
    trainer = sub.init(workload.make_model(), make_loss(workload.loss))
    model = trainer.model
    x_eval, y_eval = data.x_train[:TRAIN_EVAL_SIZE], data.y_train[:TRAIN_EVAL_SIZE]
    initial, _ = evaluate(model, workload.loss, x_eval, y_eval)
    batches = minibatches(data.x_train, data.y_train, workload.batch_size, seed)
    losses, elapsed = fit(trainer, batches, steps)
    status = "ok" if not losses or math.isfinite(losses[-1]) else "diverged"
    final, _ = evaluate(model, workload.loss, x_eval, y_eval)
    test_loss, accuracy = evaluate(model, workload.loss, data.x_test, data.y_test)
    if not math.isfinite(final) or final > DIVERGENCE_FACTOR * initial:
        status = "diverged"
    row.update(
        steps=len(losses),
        status=status,
        initial_train_loss=initial,
        final_train_loss=final,
        test_loss=test_loss,
        test_accuracy=accuracy,
        seconds_per_step=elapsed / max(len(losses), 1),
    )

    log_rows = [{"run_id": run_id, "step": i + 1, "loss": value} for i, value in enumerate(losses)]
    history = getattr(trainer.optimizer, "history", None)
    if history is not None:
        columns = history.columns()
        for i, log_row in enumerate(log_rows[: len(history)]):
            log_row.update({key: columns[key][i] for key in LOG_COLUMNS[3:] if key in columns})
        defined = [
            a for a, s in zip(columns["alpha_star"], columns["status"], strict=True) if s in report.DEFINED
        ]
        row.update(
            alpha_star_median=_median(defined),
            alpha_median=_median([a for a in columns["alpha"] if math.isfinite(a)]),
            alpha_star_defined=len(defined) / max(len(history), 1),
        )
    return RunResult(row, log_rows)


def _median(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median()) if values else math.nan


class _CsvSink:
    """A CSV file written row by row and flushed, so that an interrupted run keeps what it did."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self._file = path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=list(columns), restval="")
        self._writer.writeheader()

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def safe_run(workload: Workload, data: Data, sub: Submission, seed: int, steps: int) -> RunResult:
    """:func:`train_run`, turning an exception into a ``failed`` (or ``skipped``) row."""
    try:
        return train_run(workload, data, sub, seed, steps)
    except NotImplementedError as err:
        status, error = "skipped", str(err)
    except Exception as err:  # one broken configuration must not stop the others
        status, error = "failed", f"{type(err).__name__}: {err}"
    log.warning("%s / %s / seed %d: %s (%s)", workload.name, sub.label, seed, status, error)
    return RunResult({**_identity(workload, sub, seed), "steps": 0, "status": status, "error": error[:500]})


def _identity(workload: Workload, sub: Submission, seed: int) -> dict[str, Any]:
    """The columns of results.csv that name a run."""
    return {
        "workload": workload.name,
        "optimizer": sub.optimizer,
        "label": sub.label,
        "lr": sub.lr,
        "curvature": sub.curvature,
        "mode": sub.mode,
        "step_size": sub.step_size,
        "every": sub.every,
        "seed": seed,
        "run_id": f"{workload.name}__{sub.slug}__s{seed}",
    }


def run(
    workloads: Sequence[Workload],
    size: str,
    seeds: Sequence[int],
    out: Path,
    steps: int | None = None,
    optimizers: Sequence[str] | None = None,
    curvatures: Sequence[str] | None = None,
    progress: bool = True,
    policies: Sequence[tuple[str, int]] | None = None,
) -> list[dict[str, Any]]:
    """Run every workload × submission × seed, write the files into ``out``, and return the rows.

    Args:
        size: ``"tiny"``, ``"quick"`` or ``"full"`` (data size and default step count).
        steps: overrides every workload's step count.
        optimizers: keep only submissions with these ``optimizer`` names (all when None).
        curvatures: keep only quadstep submissions with these curvatures (all when None).
        policies: quadstep's (step-size policy, every) pairs in scale mode (all of
            :data:`~benchmarks.submissions.POLICIES` when None).
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    (out / "logs").mkdir(parents=True, exist_ok=True)
    meta = metadata(size=size, seeds=seeds, steps=steps, optimizers=optimizers, curvatures=curvatures)
    results = _CsvSink(out / "results.csv", RESULT_COLUMNS)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def write_metadata() -> None:
        meta["wall_seconds"] = round(time.perf_counter() - started, 1)
        (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")

    keep = functools.partial(_keep, optimizers=optimizers)

    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # frozen layer of `quadratic`
    planned = {
        w.name: _planned_runs(w, curvatures, keep, policies or POLICIES) * len(seeds) for w in workloads
    }
    bar = tqdm(total=sum(planned.values()), disable=not progress, unit="run", dynamic_ncols=True)
    with logging_redirect_tqdm(), bar:
        for workload in workloads:
            done = bar.n
            try:
                data = workload.load_data(seeds[0], size)
            except DataUnavailable as err:
                log.warning("skipping workload %s: %s", workload.name, err)
                meta["skipped_workloads"][workload.name] = str(err)
                write_metadata()
                bar.update(planned[workload.name])
                continue
            n_steps = steps if steps is not None else workload.steps[size]
            meta["workloads"][workload.name] = _workload_info(workload, data, n_steps)
            plan = _plan(workload, seeds, rows, keep, curvatures, policies or POLICIES)
            logs = out / "logs" / f"{workload.name}.csv"
            _run_workload(workload, data, n_steps, plan, results, logs, rows, bar)
            bar.update(done + planned[workload.name] - bar.n)  # an observe-best stage not needed
            write_metadata()
    results.close()
    write_metadata()
    return rows


def _run_workload(
    workload: Workload,
    data: Data,
    steps: int,
    plan: Iterable[tuple[Submission, int]],
    results: _CsvSink,
    logs: Path,
    rows: list[dict[str, Any]],
    bar: Any,
) -> None:
    """Run each (submission, seed) of ``plan``: its row to ``results`` and ``rows``, its steps to ``logs``."""
    sink = _CsvSink(logs, LOG_COLUMNS)
    for sub, seed in plan:
        bar.set_postfix_str(f"{workload.name}: {sub.label}, seed {seed}")
        result = safe_run(workload, data, sub, seed, steps)
        results.write([result.row])
        sink.write(result.log)
        rows.append(result.row)
        bar.update()
    sink.close()


def _keep(subs: list[Submission], optimizers: Sequence[str] | None) -> list[Submission]:
    """The submissions of ``subs`` with these ``optimizer`` names (all when None)."""
    return [s for s in subs if optimizers is None or s.optimizer in optimizers]


def _workload_info(workload: Workload, data: Data, steps: int) -> dict[str, Any]:
    """The workload's entry in metadata.json."""
    return {
        "description": workload.description,
        "loss": workload.loss,
        "batch_size": workload.batch_size,
        "steps": steps,
        "n_train": len(data.x_train),
        "n_test": len(data.x_test),
        "optimum_test_loss": workload.optimum(data) if workload.optimum else None,
    }


def _plan(
    workload: Workload,
    seeds: Sequence[int],
    rows: list[dict[str, Any]],
    keep: Callable[[list[Submission]], list[Submission]],
    curvatures: Sequence[str] | None,
    policies: Sequence[tuple[str, int]],
) -> Iterator[tuple[Submission, int]]:
    """The (submission, seed) runs of ``workload``: its grid, then alpha* along the best fixed-lr
    Adam trajectory where that is not the default lr, chosen from ``rows`` once the grid has run
    (the caller appends each run's row before asking for the next)."""
    grid = keep(submissions(workload.backpack, curvatures=curvatures, policies=policies))
    yield from ((sub, seed) for sub in grid for seed in seeds)
    best = report.best_lr([r for r in rows if r["workload"] == workload.name], BASELINE)
    if best is not None and best != DEFAULT_LR:
        observe = keep(observe_submissions(workload.backpack, [best], curvatures))
        yield from ((sub, seed) for sub in observe for seed in seeds)


def _planned_runs(
    workload: Workload,
    curvatures: Sequence[str] | None,
    keep: Callable[[list[Submission]], list[Submission]],
    policies: Sequence[tuple[str, int]],
) -> int:
    """Runs per seed for ``workload``: its grid and its observe-best stage (counted as done when not run)."""
    grid = keep(submissions(workload.backpack, curvatures=curvatures, policies=policies))
    return len(grid) + len(keep(observe_submissions(workload.backpack, [math.nan], curvatures)))


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metadata(**config: Any) -> dict[str, Any]:
    """Commit, library versions, Python, CPU and thread count, date: never the host name."""
    import quadstep

    from .submissions import ADAM_LRS, PEER_LRS, SGD_LRS

    status = _git("status", "--porcelain", "--untracked-files=no")
    data_dir = os.environ.get("QUADSTEP_DATA_DIR")
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "backpack-for-pytorch": _version("backpack-for-pytorch"),
            "quadstep": quadstep.__version__,
            **{
                name: _version(name)
                for name in ("prodigyopt", "dadaptation", "schedulefree", "numpy", "scikit-learn")
            },
        },
        "device": "cpu",
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "data_source": "--data-dir / QUADSTEP_DATA_DIR" if data_dir else "default search path",
        "config": {
            **config,
            "seeds": list(config.get("seeds", [])),
            "adam_lrs": list(ADAM_LRS),
            "sgd_lrs": list(SGD_LRS),
            "peer_lrs": PEER_LRS,
            "observe_default_lr": DEFAULT_LR,
            "divergence_factor": DIVERGENCE_FACTOR,
        },
        "workloads": {},
        "skipped_workloads": {},
    }
