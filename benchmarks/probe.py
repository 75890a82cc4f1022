r"""``python -m benchmarks probe``: where the peers' steps land on the quadratic model along them.

Each peer (Adam and SGD at their best fixed lr of the reference run, Prodigy, D-Adaptation Adam and
Schedule-Free AdamW at their defaults) trains each workload under a :class:`quadstep.StepProbe`,
which records, for every step :math:`s`, :math:`\alpha^* = -s^\top g / s^\top C s` at the point the
step started from: 1 means the step landed on the minimum of the mini-batch quadratic model along
it, above 1 that it stopped short, below 1 that it went past (below 0: it went uphill on the batch).

Writes into ``--out``: ``steps.csv`` (one row per step of every run), ``runs.csv`` (one per run),
``metadata.json``, and from those files ``summary.md`` (per workload and peer: median α*, the share of
steps past the minimum) and ``probe.png`` (α* over the steps).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from quadstep import CURVATURES, StepProbe

from . import report
from .runner import REPO_ROOT, TRAIN_EVAL_SIZE, _CsvSink, evaluate, make_loss, metadata
from .submissions import BACKPACK_CURVATURES, BASELINE, DEFAULT_LR, PEER_LRS, Submission
from .training import fit, minibatches
from .workloads import Data, DataUnavailable, Workload, all_workloads

log = logging.getLogger("benchmarks")

#: Columns of steps.csv.
STEP_COLUMNS = (
    "workload", "optimizer", "label", "lr", "seed", "step", "loss", "alpha_star", "dg", "dHd", "status"
)  # fmt: skip
#: Columns of runs.csv, one row per run.
RUN_COLUMNS = ("workload", "optimizer", "label", "lr", "seed", "final_train_loss", "seconds_per_step")
#: The reference run whose best fixed lrs Adam and SGD are probed at.
REFERENCE = REPO_ROOT / "benchmarks" / "reference" / "results.csv"
#: lr of SGD where the reference has no run of the workload.
DEFAULT_SGD_LR = 0.1
#: Window of the rolling median in the plot (steps).
WINDOW = 25


def peers(workload: str, reference: list[dict[str, Any]]) -> list[Submission]:
    """Adam and SGD at the best lr the reference found for ``workload``, then the self-tuning peers."""
    rows = [r for r in reference if r["workload"] == workload]
    adam = report.best_lr(rows, BASELINE) or DEFAULT_LR
    sgd = report.best_lr(rows, "sgd") or DEFAULT_SGD_LR
    return [Submission(BASELINE, adam), Submission("sgd", sgd)] + [
        Submission(name, lr) for name, lr in PEER_LRS.items()
    ]


def probe_run(
    workload: Workload, data: Data, sub: Submission, seed: int, steps: int, curvature: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train a fresh model (seeded) for ``steps`` steps of ``sub`` under a probe.

    Returns the run's summary (final training loss, seconds per step) and its steps.csv rows.
    """
    torch.manual_seed(seed)
    backpack = curvature in BACKPACK_CURVATURES
    trainer = sub.init(workload.make_model(), make_loss(workload.loss), extend_model=backpack)
    model = trainer.model
    probe = StepProbe(trainer.optimizer, curvature, model=model, loss_fn=trainer.loss_fn, history_size=None)
    batches = minibatches(data.x_train, data.y_train, workload.batch_size, seed)
    losses, elapsed = fit(trainer.probed(probe), batches, steps)
    final, _ = evaluate(model, workload.loss, data.x_train[:TRAIN_EVAL_SIZE], data.y_train[:TRAIN_EVAL_SIZE])
    identity = {"workload": workload.name, "optimizer": sub.optimizer, "label": sub.name, "lr": sub.lr}
    columns = probe.history.columns()
    recorded = ("step", "alpha_star", "dg", "dHd", "status")
    rows = [
        {**identity, "seed": seed, "loss": value, **{key: columns[key][i] for key in recorded}}
        for i, value in enumerate(losses)
    ]
    per_step = elapsed / max(len(losses), 1)
    summary = {**identity, "seed": seed, "final_train_loss": final, "seconds_per_step": per_step}
    return summary, rows


def has_minimum(row: dict[str, Any]) -> bool:
    """The quadratic model along the step has a minimum: sᵀCs > 0, every value finite."""
    values = (float(row["alpha_star"]), float(row["dg"]), float(row["dHd"]))
    return all(math.isfinite(v) for v in values) and values[2] > 0


def summarize(runs: list[dict[str, Any]], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workload, peer): the mean final training loss over seeds, the median α* over the
    steps of all seeds whose model has a minimum along the step (and the range of the per-seed
    medians), the share of those steps past the minimum (α* < 1) and uphill (α* < 0), and the
    share of steps without a minimum (sᵀCs ≤ 0 or not finite)."""
    table = []
    keys = list(dict.fromkeys((r["workload"], r["label"]) for r in runs))
    for workload, label in keys:
        mine = [r for r in steps if (r["workload"], r["label"]) == (workload, label)]
        with_min = [r for r in mine if has_minimum(r)]
        alphas = [float(r["alpha_star"]) for r in with_min]
        per_seed = [
            statistics.median(a)
            for seed in sorted({r["seed"] for r in with_min})
            if (a := [float(r["alpha_star"]) for r in with_min if r["seed"] == seed])
        ]
        losses = [r["final_train_loss"] for r in runs if (r["workload"], r["label"]) == (workload, label)]
        table.append(
            {
                "workload": workload,
                "label": label,
                "lr": mine[0]["lr"] if mine else math.nan,
                "final_train_loss": statistics.fmean(losses),
                "alpha_star_median": statistics.median(alphas) if alphas else math.nan,
                "seed_medians": (min(per_seed), max(per_seed)) if per_seed else (math.nan, math.nan),
                "past_minimum": sum(a < 1 for a in alphas) / len(alphas) if alphas else math.nan,
                "uphill": sum(a < 0 for a in alphas) / len(alphas) if alphas else math.nan,
                "no_minimum": 1 - len(with_min) / len(mine) if mine else math.nan,
                "steps": len(mine),
            }
        )
    return table


def summary_markdown(table: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    config = meta["config"]
    lines = [
        "# α* along the peers' steps",
        "",
        f"`{config['command']}` (size `{config['size']}`, curvature `{config['curvature']}`, seeds "
        f"{', '.join(map(str, config['seeds']))}; commit {meta['git_commit']}, "
        f"{meta['wall_seconds']} s). α* = −sᵀg / sᵀCs along each step s at the point it started from: "
        "1 = the step landed on the minimum of the batch's quadratic model along it, > 1 = short of it, "
        "< 1 = past it, < 0 = uphill on the batch. Median and shares over the steps (all seeds) where "
        "the model has a minimum along s; in brackets the range of the per-seed medians.",
        "",
        "| workload | optimizer | lr | final train loss | median α* | α* < 1 (past) | α* < 0 (uphill) "
        "| no minimum (sᵀCs ≤ 0) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in table:
        lo, hi = row["seed_medians"]
        lines.append(
            f"| {row['workload']} | {row['label']} | {row['lr']:g} | {row['final_train_loss']:.4g} | "
            f"{row['alpha_star_median']:.3g} [{lo:.3g}, {hi:.3g}] | {100 * row['past_minimum']:.0f} % | "
            f"{100 * row['uphill']:.0f} % | {100 * row['no_minimum']:.0f} % |"
        )
    return "\n".join(lines) + "\n"


def plot(steps: list[dict[str, Any]], labels: list[str], path: Path) -> Path:
    """α* over the steps, one panel per workload: per step the median over seeds (steps with a
    minimum, α* > 0), then a rolling median over :data:`WINDOW` steps; log scale, α* = 1 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in steps))
    cols = min(len(workloads), 4)
    rows = math.ceil(len(workloads) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    styles = ("-", "--", "-.", ":", (0, (5, 1)))  # Prodigy and D-Adaptation coincide while d is small
    for ax, workload in zip(axes.flat, workloads):
        for i, label in enumerate(labels):
            by_step: dict[int, list[float]] = {}
            for r in steps:
                if r["workload"] == workload and r["label"] == label and has_minimum(r):
                    if float(r["alpha_star"]) > 0:
                        by_step.setdefault(int(r["step"]), []).append(float(r["alpha_star"]))
            if not by_step:
                continue
            xs = sorted(by_step)
            medians = [statistics.median(by_step[x]) for x in xs]
            curve = report._rolling_median(medians, WINDOW)
            ax.plot(xs, curve, lw=1.3, color=colors[i % 10], ls=styles[i % len(styles)], label=label)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(workload, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("α* (1 = on the minimum)")
    handles, names = axes.flat[0].get_legend_handles_labels()
    spare = list(axes.flat)[len(workloads) :]
    for ax in spare:
        ax.axis("off")
    if spare:
        spare[0].legend(handles, names, loc="center", fontsize=9, frameon=False)
        fig.tight_layout()
    else:
        fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.15 / rows, 1, 1))
    return report._save(fig, path)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    names = list(all_workloads())
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks probe",
        description="α* = -sᵀg/sᵀCs along the steps s of Adam (best lr), SGD (best lr), Prodigy, "
        "D-Adaptation and Schedule-Free, recorded by quadstep.StepProbe.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--full", action="store_const", const="full", dest="size", help="every workload, full data and steps"
    )
    size.add_argument(
        "--tiny", action="store_const", const="tiny", dest="size", help="a few steps of tiny data"
    )
    parser.set_defaults(size="quick")
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=names,
        metavar="NAME",
        help=f"run only these ({', '.join(names)}); default: the quick ones, all with --full",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--steps", type=int, help="steps per run (default: per workload and size)")
    parser.add_argument(
        "--curvature",
        default="ggn-exact",
        choices=CURVATURES,
        help="the probe's curvature (default: ggn-exact: any model, a plain backward)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=REFERENCE,
        help="results.csv whose best fixed lrs Adam and SGD run at "
        "(default: benchmarks/reference/results.csv)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results/probe"), help="output folder (default: results/probe)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv or [])
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    workloads = all_workloads()
    names = args.workloads or [n for n, w in workloads.items() if w.quick or args.size == "full"]
    reference = report.read_results(args.reference) if args.reference.is_file() else []
    if not reference:
        log.warning(
            "no reference run at %s: Adam at lr %g, SGD at lr %g", args.reference, DEFAULT_LR, DEFAULT_SGD_LR
        )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks probe", *argv])
    meta = metadata(
        command=command, size=args.size, seeds=args.seeds, steps=args.steps, curvature=args.curvature
    )
    sink, run_sink = _CsvSink(out / "steps.csv", STEP_COLUMNS), _CsvSink(out / "runs.csv", RUN_COLUMNS)
    ran = 0
    started = time.perf_counter()
    for name in names:
        workload = workloads[name]
        try:
            data = workload.load_data(args.seeds[0], args.size)
        except DataUnavailable as err:
            log.warning("skipping workload %s: %s", name, err)
            meta["skipped_workloads"][name] = str(err)
            continue
        n_steps = args.steps or workload.steps[args.size]
        meta["workloads"][name] = {
            "steps": n_steps, "batch_size": workload.batch_size, "n_train": len(data.x_train)
        }  # fmt: skip
        for sub in peers(name, reference):
            for seed in args.seeds:
                summary, rows = probe_run(workload, data, sub, seed, n_steps, args.curvature)
                ms = 1e3 * summary["seconds_per_step"]
                log.info("%s / %s / seed %d: %.1f ms per step", name, sub.label, seed, ms)
                sink.write(rows)
                run_sink.write([summary])
                ran += 1
    sink.close()
    run_sink.close()
    if not ran:
        log.error("nothing ran (no workload had its data)")
        return 1
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_report(out)
    log.info("wrote %s, %s and %s", out / "steps.csv", out / "summary.md", out / "probe.png")
    return 0


def write_report(out: Path) -> None:
    """summary.md and probe.png from the files of a run in ``out`` (steps.csv, runs.csv, metadata.json)."""
    with (out / "steps.csv").open(newline="") as f:
        steps = [{**r, "seed": int(r["seed"]), "lr": float(r["lr"])} for r in csv.DictReader(f)]
    with (out / "runs.csv").open(newline="") as f:
        runs = [{**r, "final_train_loss": float(r["final_train_loss"])} for r in csv.DictReader(f)]
    meta = json.loads((out / "metadata.json").read_text())
    (out / "summary.md").write_text(summary_markdown(summarize(runs, steps), meta))
    plot(steps, list(dict.fromkeys(r["label"] for r in runs)), out / "probe.png")
