"""summary.md and the PNG plots, made from the files a run wrote (results.csv, logs/, metadata.json).

``python -m benchmarks report --out DIR`` regenerates them without running anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from quadstep.stepsize import DEFINED
from quadstep.stepsize import POLICIES as POLICY_NAMES

from .submissions import BASELINE, DEFAULT_LR

#: Columns of results.csv read as numbers (empty cells become None).
FLOAT_COLUMNS = (
    "lr",
    "initial_train_loss",
    "final_train_loss",
    "test_loss",
    "test_accuracy",
    "seconds_per_step",
    "alpha_star_median",
    "alpha_median",
    "alpha_star_defined",
)
INT_COLUMNS = ("seed", "steps")
#: The peers each step-size policy is scored against in the policies table (Prodigy stands for
#: D-Adaptation, its predecessor).
RIVALS = ("prodigy", "schedulefree_adamw")

Config = tuple[str, float, str, str]  # optimizer, lr, curvature, mode
Runs = dict[Config, list[dict[str, Any]]]  # the runs of each configuration


#: The plots of each workload, in the order summary.md shows them.
PLOT_KINDS = ("loss", "lr_sweep", "alpha", "policy", "alpha_dist")


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of results.csv, with numbers parsed."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in FLOAT_COLUMNS:
            row[key] = float(row[key]) if row.get(key) not in (None, "") else None
        for key in INT_COLUMNS:
            row[key] = int(row[key]) if row.get(key) not in (None, "") else None
    return rows


def read_log(path: Path) -> dict[str, dict[str, list[Any]]]:
    """logs/<workload>.csv as run_id -> column -> values (floats; NaN where empty; status as text)."""
    runs: dict[str, dict[str, list[Any]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            run = runs.setdefault(row["run_id"], {})
            for key, value in row.items():
                if key != "run_id":
                    run.setdefault(key, []).append(value if key.endswith("status") else float(value or "nan"))
    return runs


def config_of(row: dict[str, Any]) -> Config:
    """(optimizer, lr, curvature, mode); a scale-mode policy other than greedy at every step is part of
    the mode, e.g. ``scale:lagged`` or ``scale:lagged@10`` (rows without a policy are greedy)."""
    mode = row["mode"] or ""
    policy, every = row.get("step_size") or "greedy", int(row.get("every") or 1)
    if mode == "scale" and (policy, every) != ("greedy", 1):
        mode += f":{policy}" + (f"@{every}" if every > 1 else "")
    return (row["optimizer"], float(row["lr"]), row["curvature"] or "", mode)


def by_config(rows: Sequence[dict[str, Any]]) -> Runs:
    """Rows grouped by configuration, in order of first appearance."""
    groups: Runs = {}
    for row in rows:
        groups.setdefault(config_of(row), []).append(row)
    return groups


def score(runs: Sequence[dict[str, Any]]) -> float:
    """Mean final training loss over seeds; inf when any seed diverged or failed."""
    values = [r["final_train_loss"] for r in runs]
    if any(
        r["status"] != "ok" or v is None or not math.isfinite(v) for r, v in zip(runs, values, strict=True)
    ):
        return math.inf
    return sum(values) / len(values)


def best_lr(rows: Sequence[dict[str, Any]], optimizer: str) -> float | None:
    """The lr of ``optimizer`` (a plain one, e.g. ``adam``) with the lowest :func:`score`."""
    candidates = {c: score(runs) for c, runs in by_config(rows).items() if c[0] == optimizer and not c[3]}
    finite = {c: s for c, s in candidates.items() if math.isfinite(s)}
    return min(finite, key=finite.__getitem__)[1] if finite else None


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """Mean, sample std and count of the finite values."""
    x = [v for v in values if v is not None and math.isfinite(v)]
    if not x:
        return math.nan, math.nan, 0
    mean = sum(x) / len(x)
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1)) if len(x) > 1 else 0.0
    return mean, std, len(x)


def _fmt(values: Sequence[float | None], percent: bool = False) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "–"
    if percent:
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:.4g} ± {std:.2g}"


def is_quadstep(config: Config) -> bool:
    """Whether the configuration records α*: it has a mode (``observe``, ``scale``, ``scale:…``)."""
    return bool(config[3])


def is_scale(config: Config) -> bool:
    """Whether the configuration takes quadstep's α (scale mode, with any policy)."""
    return config[3].startswith("scale")


def fixed_lrs(configs: Iterable[Config]) -> dict[str, list[float]]:
    """The lrs each optimizer without a mode ran at; optimizers in order of first appearance."""
    out: dict[str, list[float]] = {}
    for name, lr, _, mode in configs:
        if not mode and lr not in out.setdefault(name, []):
            out[name].append(lr)
    return out


def lr_grids(configs: Iterable[Config]) -> list[str]:
    """The optimizers run at several lrs: a grid, of which the report picks the best lr."""
    return [name for name, lrs in fixed_lrs(configs).items() if len(lrs) > 1]


def peers(configs: Iterable[Config]) -> list[str]:
    """The optimizers run at one lr, their own default."""
    return [name for name, lrs in fixed_lrs(configs).items() if len(lrs) == 1]


def display_name(rows: Sequence[dict[str, Any]], optimizer: str) -> str:
    """``optimizer``'s name in tables: the label of its runs without a mode, less its `` lr=…``."""
    for row in rows:
        if row["optimizer"] == optimizer and not row["mode"]:
            return str(row["label"]).removesuffix(f" lr={float(row['lr']):g}")
    return optimizer


def _step_size(config: Config, runs: Sequence[dict[str, Any]], peer: Collection[str]) -> str:
    if is_scale(config):
        mean, _, n = mean_std([r["alpha_median"] for r in runs])
        return f"α̃ {mean:.3g}" if n else "–"
    if config[0] in peer:
        return f"lr {config[1]:g} (default)"
    return f"lr {config[1]:g}"


def _table(groups: Runs, peer: Collection[str], adam_seconds: float, classification: bool) -> list[str]:
    """One row per configuration of ``groups``; ``peer``: the optimizers run at their default lr."""
    head = "| optimizer | step size | final train loss | test loss |" + (
        " test acc % |" if classification else ""
    )
    head += " time/step ×Adam | α* median (defined %) | runs ok |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for config, runs in groups.items():
        alpha = "–"
        if is_quadstep(config):
            median, _, n = mean_std([r["alpha_star_median"] for r in runs])
            defined, _, _ = mean_std([r["alpha_star_defined"] for r in runs])
            alpha = f"{median:.3g} ({100 * defined:.0f}%)" if n else "–"
        seconds, _, n_sec = mean_std([r["seconds_per_step"] for r in runs])
        ratio = f"{seconds / adam_seconds:.2f}" if n_sec and adam_seconds > 0 else "–"
        ok = sum(r["status"] == "ok" for r in runs)
        statuses = sorted({r["status"] for r in runs} - {"ok"})
        cells = [
            runs[0]["label"],
            _step_size(config, runs, peer),
            _fmt([r["final_train_loss"] for r in runs if r["status"] == "ok"]),
            _fmt([r["test_loss"] for r in runs if r["status"] == "ok"]),
        ]
        if classification:
            cells.append(_fmt([r["test_accuracy"] for r in runs if r["status"] == "ok"], percent=True))
        cells += [ratio, alpha, f"{ok}/{len(runs)}" + (f" ({', '.join(statuses)})" if statuses else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def headline(rows: Sequence[dict[str, Any]]) -> Runs:
    """The main table's rows: the baseline at its best and its default lr, every quadstep variant
    (scale mode first), the peers, and every other lr grid at its best lr."""
    groups = by_config(rows)
    grids, peer = lr_grids(groups), peers(groups)
    best = {name: best_lr(rows, name) for name in grids}
    appearance = list(dict.fromkeys(c[0] for c in groups))

    def shown(config: Config) -> bool:
        name, lr = config[:2]
        defaults = (DEFAULT_LR,) if name == BASELINE else ()
        return is_quadstep(config) or name in peer or (name in grids and lr in (best[name], *defaults))

    def rank(config: Config) -> tuple[int, int, bool, float]:
        name, lr = config[:2]
        role = 0 if name == BASELINE else 1 if is_quadstep(config) else 2 if name in peer else 3
        return role, appearance.index(name), not is_scale(config), lr

    return dict(sorted(((c, runs) for c, runs in groups.items() if shown(c)), key=lambda kv: rank(kv[0])))


def _classification(meta: dict[str, Any], workload: str) -> bool:
    """Whether the workload's loss is cross-entropy (its metric is the accuracy), by the run's metadata."""
    return meta.get("workloads", {}).get(workload, {}).get("loss", "cross_entropy") == "cross_entropy"


def _variants(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """quadstep's scale-mode variants, as (optimizer, curvature, mode) -> label."""
    return {(c[0], *c[2:]): runs[0]["label"] for c, runs in by_config(rows).items() if is_scale(c)}


def _variant(groups: Runs, key: tuple[str, str, str]) -> Config | None:
    return next((c for c in groups if (c[0], *c[2:]) == key), None)


def overview(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """One row per workload: final train loss (test accuracy) of the baseline at its best lr, each
    alpha* scale variant, each peer and every other lr grid at its best lr; mean over seeds,
    "diverged" where any seed did."""
    variants = _variants(rows)
    configs = by_config(rows)
    peer = peers(configs)
    grids = [BASELINE, *(g for g in lr_grids(configs) if g != BASELINE)]
    head = ["workload", f"{display_name(rows, BASELINE)}, best lr", *variants.values()]
    head += [display_name(rows, name) for name in peer]
    head += [f"{display_name(rows, name)}, best lr" for name in grids[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        wrows = [r for r in rows if r["workload"] == workload]
        groups = by_config(wrows)
        classification = _classification(meta, workload)
        best = {name: best_lr(wrows, name) for name in grids}
        at_best = {n: (n, lr, "", "") if lr is not None else None for n, lr in best.items()}
        at_default = {c[0]: c for c in groups if c[0] in peer}
        cells = [
            workload,
            _overview_cell(groups, at_best[BASELINE], classification, lr_label=True),
            *[_overview_cell(groups, _variant(groups, key), classification) for key in variants],
            *[_overview_cell(groups, at_default.get(name), classification) for name in peer],
            *[_overview_cell(groups, at_best[n], classification, lr_label=True) for n in grids[1:]],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _overview_cell(groups: Runs, config: Config | None, classification: bool, lr_label: bool = False) -> str:
    runs = groups.get(config) if config else None
    if not runs:
        return "–"
    if not math.isfinite(score(runs)):
        return "diverged"
    text = f"{mean_std([r['final_train_loss'] for r in runs])[0]:.3g}"
    if classification:
        text += f" ({100 * mean_std([r['test_accuracy'] for r in runs])[0]:.1f} %)"
    return (f"lr {config[1]:g}: " if lr_label and config else "") + text


def _metric(runs: Sequence[dict[str, Any]], classification: bool) -> tuple[float, float, bool]:
    """Mean and std of the test metric over seeds, and whether every seed ran to the end."""
    key = "test_accuracy" if classification else "test_loss"
    mean, std, n = mean_std([r[key] for r in runs])
    return mean, std, n == len(runs) and all(r["status"] == "ok" for r in runs)


Metric = tuple[float, float, bool]


def reaches(a: Metric, b: Metric, classification: bool) -> bool:
    """Whether metric ``a`` reaches ``b``: better, or within the larger seed std, or (accuracy) 1 point."""
    if not a[2] or math.isnan(a[0]):
        return False
    if not b[2] or math.isnan(b[0]):
        return True
    better = a[0] >= b[0] if classification else a[0] <= b[0]
    return better or abs(a[0] - b[0]) <= max(a[1], b[1]) or (classification and b[0] - a[0] <= 0.01)


def rivals(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The :data:`RIVALS` that ran, as optimizer -> name."""
    ran = {r["optimizer"] for r in rows}
    return {name: display_name(rows, name) for name in RIVALS if name in ran}


def _metric_text(m: Metric, classification: bool) -> str:
    if math.isnan(m[0]):
        return "–"
    value = f"{100 * m[0]:.1f} ± {100 * m[1]:.1f} %" if classification else f"{m[0]:.4g} ± {m[1]:.2g}"
    return value if m[2] else value + " (diverged)"


def _best_baseline(groups: Runs, classification: bool) -> Config | None:
    """The baseline's lr with the best mean test metric over complete runs."""
    baseline = {c: _metric(runs, classification) for c, runs in groups.items() if c[0] == BASELINE}
    sign = -1 if classification else 1

    def rank(c: Config) -> float:
        mean, _, complete = baseline[c]
        return sign * mean if complete and not math.isnan(mean) else math.inf

    return min(baseline, key=rank) if baseline else None


def policies_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """Per workload: the best baseline lr's test metric beside every quadstep scale variant and the
    rivals, each marked where it reaches the best baseline lr and each rival; then the count of
    workloads each variant reaches."""
    variants, rival = _variants(rows), rivals(rows)
    head = ["workload", "best Adam", *variants.values(), *rival.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    counts = {k: [0, 0, 0] for k in variants}  # reached the baseline, tied every rival, workloads run
    for workload in dict.fromkeys(r["workload"] for r in rows):
        groups = by_config([r for r in rows if r["workload"] == workload])
        classification = _classification(meta, workload)
        best = _best_baseline(groups, classification)
        if best is None:
            continue
        target = _metric(groups[best], classification)
        peer = {c[0]: _metric(runs, classification) for c, runs in groups.items() if c[0] in rival}
        cells = [workload, f"lr {best[1]:g}: {_metric_text(target, classification)}"]
        for key in variants:
            config = _variant(groups, key)
            if config is None:
                cells.append("–")
                continue
            m = _metric(groups[config], classification)
            reached = reaches(m, target, classification)
            ties = [name for name in rival if name in peer and reaches(m, peer[name], classification)]
            marks = ["✓"] * reached + [f"≥{rival[name][0]}" for name in ties]
            counts[key][0] += reached
            counts[key][1] += len(ties) == len(peer)
            counts[key][2] += 1
            cells.append(_metric_text(m, classification) + (" " + " ".join(marks) if marks else ""))
        cells += [_metric_text(peer[name], classification) if name in peer else "–" for name in rival]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"| variant | reaches best Adam | beats or ties {' and '.join(rival.values())} |"]
    lines += ["| --- | --- | --- |"]
    lines += [f"| {variants[k]} | {c[0]} of {c[2]} | {c[1]} of {c[2]} |" for k, c in counts.items() if c[2]]
    return lines


def _preamble(meta: dict[str, Any]) -> list[str]:
    """The title, the run's metadata and what the columns mean."""
    versions = meta.get("versions", {})
    cfg = meta.get("config", {})
    lines = [
        "# quadstep benchmark: α* along Adam's direction against fixed learning rates",
        "",
        f"Run {meta.get('date_utc', '?')}, commit `{(meta.get('git_commit') or '?')[:10]}`"
        + (" (uncommitted changes)" if meta.get("git_dirty") else "")
        + f", size `{cfg.get('size', '?')}`, seeds {cfg.get('seeds', '?')}, "
        f"torch {versions.get('torch')}, BackPACK {versions.get('backpack-for-pytorch')}, "
        f"{meta.get('cpu', '?')}, {meta.get('torch_threads', '?')} torch threads, "
        f"wall time {meta.get('wall_seconds', '?')} s.",
        "",
        "Mean ± std over seeds. *final train loss*: on the training set (≤ 10 000 examples) after the "
        "last step; *test loss/acc*: on the test set. *step size*: the fixed lr, or for α* scale mode α̃, "
        "the median α actually used (over steps, mean over seeds). *α\\* median*: median of α* over the "
        "steps where it is defined (mean over seeds), and the share of such steps. *time/step*: "
        "forward+backward+step relative to the mean of `torch.optim.Adam` over its lr grid in the same run "
        "(plain optimizers on a plain model, BackPACK ones on an extended model). Best lr: lowest mean "
        "final training loss among the lrs where no seed diverged. Regenerate with "
        "`python -m benchmarks report --out DIR`.",
        "",
    ]
    if meta.get("note"):
        lines += [f"*Note:* {meta['note']}", ""]
    for name, info in meta.get("skipped_workloads", {}).items():
        lines += [f"**{name} skipped**: {info}", ""]
    return lines


def summary_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """summary.md: per workload, best Adam lr beside each alpha* variant and each peer (mean ± std)."""
    names = list(rivals(rows).values())
    marks = " / ".join(f"≥{name[0]}" for name in names)
    lines = _preamble(meta) + [
        "## Step-size policies against a tuned Adam",
        "",
        "Test metric (accuracy, else test loss), mean ± std over seeds. *Best Adam*: the lr of the grid "
        "with the best mean test metric. A cell is marked ✓ when it reaches that (better, or within the "
        f"larger of the two seed stds, or for accuracy within 1 point), and {marks} when it beats or ties "
        f"{' / '.join(names)} by the same rule. Rows with a run that diverged or failed count as "
        "not reached.",
        "",
        *policies_table(rows, meta),
        "",
        "## Overview",
        "",
        "Final training loss (test accuracy), mean over seeds; α* rows in scale mode with the default clip.",
        "",
        *overview(rows, meta),
        "",
    ]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        info = meta.get("workloads", {}).get(workload, {})
        lines += _workload_section(workload, [r for r in rows if r["workload"] == workload], info)
    return "\n".join(lines)


def _workload_section(workload: str, rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    """A workload's headline table, notes and full table; ``info``: its entry in the metadata."""
    classification = info.get("loss", "cross_entropy") == "cross_entropy"
    adam_seconds, _, _ = mean_std([r["seconds_per_step"] for r in rows if r["optimizer"] == BASELINE])
    groups = by_config(rows)
    peer = peers(groups)
    lines = [
        f"## {workload}",
        "",
        f"{info.get('description', '')}; {info.get('steps', '?')} steps of batch "
        f"{info.get('batch_size', '?')}, "
        f"{info.get('n_train', '?')} train / {info.get('n_test', '?')} test examples.",
        "",
    ]
    if info.get("optimum_test_loss") is not None:
        lines += [f"Exact minimum of the test loss: {info['optimum_test_loss']:.4g}.", ""]
    lines += _table(headline(rows), peer, adam_seconds, classification)
    lines += ["", _notes(rows), "", "<details><summary>All configurations</summary>", ""]
    lines += _table(groups, peer, adam_seconds, classification)
    lines += ["", "</details>", ""]
    plots = [f"{kind}_{workload}.png" for kind in PLOT_KINDS]
    return lines + [" ".join(f"![{p}](plots/{p})" for p in plots), ""]


def _notes(rows: Sequence[dict[str, Any]]) -> str:
    """The best Adam lr, α* along each observed trajectory, and the best α* variant against Adam."""
    groups = by_config(rows)
    adam = best_lr(rows, BASELINE)
    notes = [f"Best Adam lr: {adam:g}." if adam else "Every Adam lr diverged."]
    grid = sorted({c[1] for c in groups if c[0] == BASELINE and not c[3]})
    if adam and len(grid) > 1 and adam in (grid[0], grid[-1]):
        notes[0] = f"Best Adam lr: {adam:g}, at the edge of the grid (a rate beyond it may do better)."
    for config, runs in groups.items():
        median, std, n = mean_std([r["alpha_star_median"] for r in runs])
        if config[3] == "observe" and n:  # along the baseline's trajectory
            notes.append(
                f"Along Adam lr={config[1]:g}, α* ({config[2]}) has median {median:.3g} ± {std:.2g} "
                f"({median / config[1]:.3g}× that lr"
                + (f", {median / adam:.3g}× the best lr)." if adam else ").")
            )
    scores = {c: score(runs) for c, runs in groups.items() if is_scale(c)}
    finite = {c: v for c, v in scores.items() if math.isfinite(v)}
    if adam and finite:
        best_alpha = min(finite, key=finite.__getitem__)
        adam_score = score(groups[(BASELINE, adam, "", "")])
        ratio = f" ({finite[best_alpha] / adam_score:.3g}×)" if adam_score > 0 else ""
        notes.append(
            f"Best α* variant ({best_alpha[2]}): final training loss {finite[best_alpha]:.4g} against "
            f"{adam_score:.4g} for Adam at its best lr{ratio}."
        )
    elif scores:
        notes.append("Every α* variant diverged or failed in at least one seed.")
    return " ".join(notes)


# ---------------------------------------------------------------- plots


def _ema(values: Sequence[float], beta: float = 0.95) -> list[float]:
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        avg, weight = beta * avg + (1 - beta) * v, beta * weight + (1 - beta)
        out.append(avg / weight)
    return out


def _mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    length = max(len(c) for c in curves)
    out = []
    for i in range(length):
        x = [c[i] for c in curves if i < len(c) and math.isfinite(c[i])]
        out.append(sum(x) / len(x) if x else math.nan)
    return out


def _rolling_median(values: Sequence[float], window: int | None = None) -> list[float]:
    """The median of the finite values in each trailing window (default: a 50th of the curve, at least 5)."""
    window = window or max(len(values) // 50, 5)
    out = []
    for i in range(len(values)):
        x = sorted(v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v))
        out.append(x[len(x) // 2] if x else math.nan)
    return out


def _against_lr_grid(ax: Any, lr_grid: Sequence[float], best_lr: float | None, ylabel: str, title: str) -> None:
    """Log-scale step-size curves over steps, with Adam's lr grid as labelled horizontal lines, the
    best lr in black."""
    ax.set(yscale="log", xlabel="step", ylabel=ylabel, title=title)
    for lr in lr_grid:
        best = lr == best_lr
        ax.axhline(lr, color="black" if best else "gray", ls="-" if best else "--", lw=1.6 if best else 0.6)
        ax.annotate(
            f"Adam lr {lr:g}" + (" (best)" if best else ""), (1.0, lr), xycoords=("axes fraction", "data"),
            fontsize=7, ha="right", va="bottom", color="black" if best else "gray",
        )  # fmt: skip


def _median_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """The per-step median over curves of the finite values (NaN where none is)."""
    steps = max((len(c) for c in curves), default=0)
    per_step = [sorted(v for c in curves if t < len(c) and math.isfinite(v := c[t])) for t in range(steps)]
    return [v[len(v) // 2] if v else math.nan for v in per_step]


def _alpha_star(run: dict[str, list[Any]]) -> list[float]:
    """alpha* where it is defined and positive, NaN elsewhere."""
    return [
        a if s in DEFINED and math.isfinite(a) and a > 0 else math.nan
        for a, s in zip(run.get("alpha_star", []), run.get("status", []), strict=True)
    ]


Logs = dict[str, dict[str, list[Any]]]  # run_id -> column -> values


def plot_workload(workload: str, rows: Sequence[dict[str, Any]], logs: Logs, folder: Path) -> list[Path]:
    """loss_, lr_sweep_, alpha_, policy_ and alpha_dist_<workload>.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    styles = _line_styles(plt, 20)  # α* variants often coincide exactly: keep every line visible
    plots = {
        "loss": _loss_plot,
        "lr_sweep": _lr_sweep_plot,
        "alpha": _alpha_plot,
        "policy": _policy_plot,
        "alpha_dist": _alpha_dist_plot,
    }
    written = []
    for kind in PLOT_KINDS:
        draw = plots[kind]
        fig, ax = plt.subplots(figsize=(10, 5))
        draw(ax, workload, rows, logs, styles)
        _legend(ax)
        written.append(_save(fig, folder / f"{kind}_{workload}.png"))
    return written


def _loss_plot(ax: Any, workload: str, rows: Sequence[dict[str, Any]], logs: Logs, styles: list[Any]) -> None:
    """Training loss curves of the headline configurations (observe mode is the baseline's trajectory)."""
    best = best_lr(rows, BASELINE)
    shown = [(c, runs) for c, runs in headline(rows).items() if c[3] != "observe"]
    for i, (config, runs) in enumerate(shown):
        curves = [_ema(logs[r["run_id"]]["loss"]) for r in runs if r["run_id"] in logs]
        if not curves:
            continue
        label = runs[0]["label"] + (" (best)" if config[0] == BASELINE and config[1] == best else "")
        ax.plot(_mean_curve(curves), lw=1.6, **styles[i % len(styles)], label=label)
    ax.set(
        yscale="log",
        xlabel="step",
        ylabel="mini-batch training loss (EMA 0.95, mean over seeds)",
        title=f"{workload}: training loss",
    )


def _lr_sweep_plot(
    ax: Any, workload: str, rows: Sequence[dict[str, Any]], logs: Logs, styles: list[Any]
) -> None:
    """Final training loss against each lr grid, with the scale-mode variants and the peers as levels."""
    groups = by_config(rows)
    for name, marker in zip(lr_grids(groups), ("o", "s", "^", "D", "v")):
        points = [
            (c[1], *mean_std([r["final_train_loss"] for r in runs if r["status"] == "ok"])[:2])
            for c, runs in groups.items()
            if c[0] == name and not c[3]
        ]
        points = [p for p in points if math.isfinite(p[1])]
        if points:
            xs, ys, es = zip(*sorted(points), strict=True)
            label = f"{display_name(rows, name)}, fixed lr"
            ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=label)
    peer = peers(groups)
    others = [(c, runs) for c, runs in headline(rows).items() if c[0] in peer or is_scale(c)]
    for i, (config, runs) in enumerate(others):
        ok = [r for r in runs if r["status"] == "ok"]
        mean, _, n = mean_std([r["final_train_loss"] for r in ok])
        if not n:
            continue
        style = styles[(i + 2) % len(styles)]
        label = runs[0]["label"]
        if is_scale(config):  # a star where the median α it used sits on the lr axis
            used, _, n_used = mean_std([r["alpha_median"] for r in ok])
            if n_used and used > 0:
                ax.plot([used], [mean], "*", ms=11, color=style["color"])
                label += f" (★ at median α {used:.2g})"
        ax.axhline(mean, ls=style["ls"], lw=1.3, color=style["color"], label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="learning rate / step size",
        ylabel="final training loss (mean ± std)",
        title=f"{workload}: fixed learning rates against α* and the peers",
    )


def _quadstep_runs(rows: Sequence[dict[str, Any]]) -> tuple[Runs, list[float], float | None]:
    """The configurations that record α*, the baseline's lr grid and its best lr."""
    groups = by_config(rows)
    quad = {c: runs for c, runs in groups.items() if is_quadstep(c)}
    grid = sorted({c[1] for c in groups if c[0] == BASELINE and not c[3]})
    return quad, grid, best_lr(rows, BASELINE)


def _alpha_plot(
    ax: Any, workload: str, rows: Sequence[dict[str, Any]], logs: Logs, styles: list[Any]
) -> None:
    """α* over the steps against the baseline's lr grid."""
    quad, grid, best = _quadstep_runs(rows)
    for i, runs in enumerate(quad.values()):
        curves = [_alpha_star(logs[r["run_id"]]) for r in runs if r["run_id"] in logs]
        curves = [c for c in curves if any(math.isfinite(v) for v in c)]
        if curves:
            medians = _median_curve(curves)
            curve = _rolling_median(medians)
            ax.plot(curve, lw=1.4, **styles[i % len(styles)], label=runs[0]["label"])
    _against_lr_grid(
        ax, grid, best, "α* (rolling median over steps, median over seeds)",
        f"{workload}: α* over steps against Adam's learning-rate grid",
    )  # fmt: skip


def _policy_plot(
    ax: Any, workload: str, rows: Sequence[dict[str, Any]], logs: Logs, styles: list[Any]
) -> None:
    """The α each policy used (scale mode) or proposed (observe mode) against the baseline's lr grid."""
    quad, grid, best = _quadstep_runs(rows)
    k = 0
    for config, runs in quad.items():
        columns = ["alpha"] if is_scale(config) else [f"{p}.alpha" for p in POLICY_NAMES]
        for column in columns:
            medians = _median_curve([logs[r["run_id"]].get(column, []) for r in runs if r["run_id"] in logs])
            if not any(math.isfinite(v) for v in medians):
                continue
            label = runs[0]["label"] if column == "alpha" else f"{runs[0]['label']}: {column[:-6]} proposes"
            style = {**styles[k % len(styles)], **({} if column == "alpha" else {"ls": ":"})}
            ax.plot(_rolling_median(medians), lw=1.4, **style, label=label)
            k += 1
    _against_lr_grid(
        ax, grid, best, "α used / proposed (rolling median, median over seeds)",
        f"{workload}: each step-size policy's α against Adam's learning-rate grid",
    )  # fmt: skip


def _alpha_dist_plot(
    ax: Any, workload: str, rows: Sequence[dict[str, Any]], logs: Logs, styles: list[Any]
) -> None:
    """Histograms of log10 α* over steps and seeds, one per configuration, on shared bins."""
    quad, grid, best = _quadstep_runs(rows)
    samples = [
        [
            math.log10(v)
            for r in runs
            if r["run_id"] in logs
            for v in _alpha_star(logs[r["run_id"]])
            if math.isfinite(v)
        ]
        for runs in quad.values()
    ]
    pooled = sorted(v for values in samples for v in values)
    if pooled:  # the same bins for every variant, over the central 99% (outliers land in the end bins)
        low, high = pooled[int(0.005 * (len(pooled) - 1))], pooled[int(0.995 * (len(pooled) - 1))]
        edges = [low + (high - low + 1e-9) * k / 60 for k in range(61)]
        for i, (runs, values) in enumerate(zip(quad.values(), samples, strict=True)):
            if values:
                style = styles[i % len(styles)]
                ax.hist(
                    [min(max(v, edges[0]), edges[-1]) for v in values], bins=edges, histtype="step",
                    density=True, lw=1.4, ls=style["ls"], color=style["color"],
                    label=f"{runs[0]['label']} ({len(values)} steps)",
                )  # fmt: skip
    for lr in grid:
        ax.axvline(math.log10(lr), color="black" if lr == best else "gray", ls="-" if lr == best else "--",
                   lw=1.6 if lr == best else 0.6)  # fmt: skip
    ax.set(
        xlabel="log10 α*  (vertical lines: Adam lr grid, solid = best lr; outer 1% clipped)",
        ylabel="density",
        title=f"{workload}: distribution of α* over steps and seeds",
    )


#: Markers for the lines of one plot, in order: with their colours, twelve lines stay apart.
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")


def _line_styles(plt: Any, n: int) -> list[dict[str, Any]]:
    """``n`` distinct line styles: no colour repeats (tab20's strong shades first, then the light
    ones), markers and dashes cycle, and each line's markers start at its own offset along the line,
    so that curves which coincide exactly still show all their markers."""
    palette = plt.get_cmap("tab20").colors
    colors = list(palette[0::2]) + list(palette[1::2])
    dashes = ("-", "--", "-.", ":")
    return [
        {
            "color": colors[i % len(colors)],
            "ls": dashes[i % len(dashes)],
            "marker": _MARKERS[i % len(_MARKERS)],
            "ms": 5,
            "markevery": ((i % len(_MARKERS)) / len(_MARKERS) * 0.1, 0.1),
        }
        for i in range(n)
    ]


def _legend(ax: Any) -> None:
    """Legend outside the axes, on the right: curves stay visible."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path) -> list[Path]:
    """Write summary.md and plots/*.png from the files in ``out``; returns the paths written."""
    rows = read_results(out / "results.csv")
    meta_path = out / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    summary = out / "summary.md"
    summary.write_text(summary_markdown(rows, meta))
    written = [summary]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        log_path = out / "logs" / f"{workload}.csv"
        logs = read_log(log_path) if log_path.exists() else {}
        written += plot_workload(
            workload, [r for r in rows if r["workload"] == workload], logs, out / "plots"
        )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks report", description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path("results"), help="folder of a run (default: results/)"
    )
    args = parser.parse_args(argv)
    if not (args.out / "results.csv").exists():
        parser.error(
            f"{args.out / 'results.csv'} not found: run `python -m benchmarks --quick --out {args.out}` first"
        )
    for path in write_report(args.out):
        print(path)
    return 0
