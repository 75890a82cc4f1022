"""summary.md and the PNG plots, made from the files a run wrote (results.csv, logs/, metadata.json).

``python -m benchmarks report --out DIR`` regenerates them without running anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quadstep.stepsize import DEFINED
from quadstep.stepsize import POLICIES as POLICY_NAMES

from .submissions import DEFAULT_LR

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
PEERS = ("prodigy", "dadapt_adam", "schedulefree_adamw")

Config = tuple[str, float, str, str]  # optimizer, lr, curvature, mode


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


def by_config(rows: Sequence[dict[str, Any]]) -> dict[Config, list[dict[str, Any]]]:
    """Rows grouped by configuration, in order of first appearance."""
    groups: dict[Config, list[dict[str, Any]]] = {}
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


def _step_size(config: Config, runs: Sequence[dict[str, Any]]) -> str:
    if config[0] == "quadstep_adam" and config[3].startswith("scale"):
        mean, _, n = mean_std([r["alpha_median"] for r in runs])
        return f"α̃ {mean:.3g}" if n else "–"
    if config[0] in PEERS:
        return f"lr {config[1]:g} (default)"
    return f"lr {config[1]:g}"


def _table(
    groups: dict[Config, list[dict[str, Any]]], adam_seconds: float, classification: bool
) -> list[str]:
    head = "| optimizer | step size | final train loss | test loss |" + (
        " test acc % |" if classification else ""
    )
    head += " time/step ×Adam | α* median (defined %) | runs ok |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for config, runs in groups.items():
        alpha = "–"
        if config[0] == "quadstep_adam":
            median, _, n = mean_std([r["alpha_star_median"] for r in runs])
            defined, _, _ = mean_std([r["alpha_star_defined"] for r in runs])
            alpha = f"{median:.3g} ({100 * defined:.0f}%)" if n else "–"
        seconds, _, n_sec = mean_std([r["seconds_per_step"] for r in runs])
        ratio = f"{seconds / adam_seconds:.2f}" if n_sec and adam_seconds > 0 else "–"
        ok = sum(r["status"] == "ok" for r in runs)
        statuses = sorted({r["status"] for r in runs} - {"ok"})
        cells = [
            runs[0]["label"],
            _step_size(config, runs),
            _fmt([r["final_train_loss"] for r in runs if r["status"] == "ok"]),
            _fmt([r["test_loss"] for r in runs if r["status"] == "ok"]),
        ]
        if classification:
            cells.append(_fmt([r["test_accuracy"] for r in runs if r["status"] == "ok"], percent=True))
        cells += [ratio, alpha, f"{ok}/{len(runs)}" + (f" ({', '.join(statuses)})" if statuses else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def headline(rows: Sequence[dict[str, Any]]) -> dict[Config, list[dict[str, Any]]]:
    """The main table's rows: best and default (1e-3) Adam lr, every alpha* variant, the peers, best SGD."""
    groups = by_config(rows)
    adam, sgd = best_lr(rows, "adam"), best_lr(rows, "sgd")
    picked: dict[Config, list[dict[str, Any]]] = {}
    for config, runs in groups.items():
        name, lr, _, mode = config
        if (
            (name == "adam" and lr in (adam, DEFAULT_LR))
            or name == "quadstep_adam"
            or name in PEERS
            or (name == "sgd" and lr == sgd)
        ):
            picked[config] = runs
    order = {"adam": 0, "quadstep_adam": 1, "prodigy": 2, "dadapt_adam": 3, "schedulefree_adamw": 4, "sgd": 5}
    return dict(
        sorted(
            picked.items(),
            key=lambda kv: (order.get(kv[0][0], 9), not kv[0][3].startswith("scale"), kv[0][1]),
        )
    )


def _classification(meta: dict[str, Any], workload: str) -> bool:
    """Whether the workload's loss is cross-entropy (its metric is the accuracy), by the run's metadata."""
    return meta.get("workloads", {}).get(workload, {}).get("loss", "cross_entropy") == "cross_entropy"


def overview(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """One row per workload: final train loss (test accuracy) of the best Adam lr, each alpha*
    scale variant, each peer and the best SGD lr; mean over seeds, "diverged" where any seed did."""
    variants = {c[2:]: runs[0]["label"] for c, runs in by_config(rows).items()
                if c[0] == "quadstep_adam" and c[3].startswith("scale")}
    head = ["workload", "Adam, best lr", *variants.values(), "Prodigy", "D-Adapt Adam",
            "Schedule-Free AdamW", "SGD, best lr"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        wrows = [r for r in rows if r["workload"] == workload]
        classification = _classification(meta, workload)
        groups = by_config(wrows)

        def cell(config: Config | None, lr_label: bool = False) -> str:
            runs = groups.get(config) if config else None
            if not runs:
                return "–"
            if not math.isfinite(score(runs)):
                return "diverged"
            text = f"{mean_std([r['final_train_loss'] for r in runs])[0]:.3g}"
            if classification:
                text += f" ({100 * mean_std([r['test_accuracy'] for r in runs])[0]:.1f} %)"
            return (f"lr {config[1]:g}: " if lr_label and config else "") + text

        adam, sgd = best_lr(wrows, "adam"), best_lr(wrows, "sgd")
        peers = {c[0]: c for c in groups if c[0] in PEERS}
        cells = [
            workload,
            cell(("adam", adam, "", "") if adam is not None else None, lr_label=True),
            *[cell(next((c for c in groups if c[0] == "quadstep_adam" and c[2:] == k), None))
              for k in variants],
            *[cell(peers.get(name)) for name in PEERS],
            cell(("sgd", sgd, "", "") if sgd is not None else None, lr_label=True),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _metric(runs: Sequence[dict[str, Any]], classification: bool) -> tuple[float, float, bool]:
    """Mean and std of the test metric over seeds, and whether every seed ran to the end."""
    key = "test_accuracy" if classification else "test_loss"
    mean, std, n = mean_std([r[key] for r in runs])
    return mean, std, n == len(runs) and all(r["status"] == "ok" for r in runs)


def reaches(a: tuple[float, float, bool], b: tuple[float, float, bool], classification: bool) -> bool:
    """Whether metric ``a`` reaches ``b``: better, or within the larger seed std, or (accuracy) 1 point."""
    if not a[2] or math.isnan(a[0]):
        return False
    if not b[2] or math.isnan(b[0]):
        return True
    better = a[0] >= b[0] if classification else a[0] <= b[0]
    return better or abs(a[0] - b[0]) <= max(a[1], b[1]) or (classification and b[0] - a[0] <= 0.01)


def policies_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """Per workload: the best Adam lr's test metric beside every quadstep scale variant and the
    peers, each marked where it reaches the best Adam lr, Prodigy and Schedule-Free; then the count
    of workloads each variant reaches."""
    variants = {c[2:]: runs[0]["label"] for c, runs in by_config(rows).items()
                if c[0] == "quadstep_adam" and c[3].startswith("scale")}
    peers = {"prodigy": "Prodigy", "schedulefree_adamw": "Schedule-Free AdamW"}
    head = ["workload", "best Adam", *variants.values(), *peers.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    counts = {k: [0, 0, 0] for k in variants}  # reached Adam, tied both peers, workloads run
    for workload in dict.fromkeys(r["workload"] for r in rows):
        wrows = [r for r in rows if r["workload"] == workload]
        classification = _classification(meta, workload)
        groups = by_config(wrows)
        adam = {c: _metric(runs, classification) for c, runs in groups.items() if c[0] == "adam"}
        if not adam:
            continue
        sign = -1 if classification else 1
        def rank(c: Config) -> float:
            mean, _, complete = adam[c]
            return sign * mean if complete and not math.isnan(mean) else math.inf

        best = min(adam, key=rank)
        target = adam[best]
        peer = {c[0]: _metric(runs, classification) for c, runs in groups.items() if c[0] in peers}

        def text(m: tuple[float, float, bool]) -> str:
            if math.isnan(m[0]):
                return "–"
            if classification:
                value = f"{100 * m[0]:.1f} ± {100 * m[1]:.1f} %"
            else:
                value = f"{m[0]:.4g} ± {m[1]:.2g}"
            return value if m[2] else value + " (diverged)"

        cells = [workload, f"lr {best[1]:g}: {text(target)}"]
        for key in variants:
            config = next((c for c in groups if c[0] == "quadstep_adam" and c[2:] == key), None)
            if config is None:
                cells.append("–")
                continue
            m = _metric(groups[config], classification)
            marks = [mark for ok, mark in [(reaches(m, target, classification), "✓")] if ok]
            ties = [name for name in peers if name in peer and reaches(m, peer[name], classification)]
            marks += [f"≥{peers[name][0]}" for name in ties]
            counts[key][0] += reaches(m, target, classification)
            counts[key][1] += len(ties) == len([n for n in peers if n in peer])
            counts[key][2] += 1
            cells.append(text(m) + (" " + " ".join(marks) if marks else ""))
        cells += [text(peer[name]) if name in peer else "–" for name in peers]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| variant | reaches best Adam | beats or ties Prodigy and Schedule-Free |"]
    lines += ["| --- | --- | --- |"]
    lines += [f"| {variants[k]} | {c[0]} of {c[2]} | {c[1]} of {c[2]} |" for k, c in counts.items() if c[2]]
    return lines


def summary_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """summary.md: per workload, best Adam lr beside each alpha* variant and each peer (mean ± std)."""
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
    lines += [
        "## Step-size policies against a tuned Adam",
        "",
        "Test metric (accuracy, else test loss), mean ± std over seeds. *Best Adam*: the lr of the grid "
        "with the best mean test metric. A cell is marked ✓ when it reaches that (better, or within the "
        "larger of the two seed stds, or for accuracy within 1 point), and ≥P / ≥S when it beats or ties "
        "Prodigy / Schedule-Free by the same rule. Rows with a run that diverged or failed count as "
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
        wrows = [r for r in rows if r["workload"] == workload]
        info = meta.get("workloads", {}).get(workload, {})
        classification = info.get("loss", "cross_entropy") == "cross_entropy"
        adam_seconds, _, _ = mean_std([r["seconds_per_step"] for r in wrows if r["optimizer"] == "adam"])
        lines += [
            f"## {workload}",
            "",
            f"{info.get('description', '')}; {info.get('steps', '?')} steps of batch "
            f"{info.get('batch_size', '?')}, "
            f"{info.get('n_train', '?')} train / {info.get('n_test', '?')} test examples.",
            "",
        ]
        if info.get("optimum_test_loss") is not None:
            lines += [f"Exact minimum of the test loss: {info['optimum_test_loss']:.4g}.", ""]
        lines += _table(headline(wrows), adam_seconds, classification)
        adam = best_lr(wrows, "adam")
        observed = [
            (c, runs) for c, runs in by_config(wrows).items() if c[0] == "quadstep_adam" and c[3] == "observe"
        ]
        notes = [f"Best Adam lr: {adam:g}." if adam else "Every Adam lr diverged."]
        grid = sorted({c[1] for c in by_config(wrows) if c[0] == "adam"})
        if adam and len(grid) > 1 and adam in (grid[0], grid[-1]):
            notes[0] = f"Best Adam lr: {adam:g}, at the edge of the grid (a rate beyond it may do better)."
        for config, runs in observed:
            median, std, n = mean_std([r["alpha_star_median"] for r in runs])
            if n:
                notes.append(
                    f"Along Adam lr={config[1]:g}, α* ({config[2]}) has median {median:.3g} ± {std:.2g} "
                    f"({median / config[1]:.3g}× that lr"
                    + (f", {median / adam:.3g}× the best lr)." if adam else ").")
                )
        groups = by_config(wrows)
        scores = {
            c: score(runs)
            for c, runs in groups.items()
            if c[0] == "quadstep_adam" and c[3].startswith("scale")
        }
        finite = {c: v for c, v in scores.items() if math.isfinite(v)}
        if adam and finite:
            best_alpha = min(finite, key=finite.__getitem__)
            adam_score = score(groups[("adam", adam, "", "")])
            ratio = f" ({finite[best_alpha] / adam_score:.3g}×)" if adam_score > 0 else ""
            notes.append(
                f"Best α* variant ({best_alpha[2]}): final training loss {finite[best_alpha]:.4g} against "
                f"{adam_score:.4g} for Adam at its best lr{ratio}."
            )
        elif scores:
            notes.append("Every α* variant diverged or failed in at least one seed.")
        lines += ["", " ".join(notes), "", "<details><summary>All configurations</summary>", ""]
        lines += _table(groups, adam_seconds, classification)
        lines += ["", "</details>", ""]
        plots = [f"{kind}_{workload}.png" for kind in ("loss", "lr_sweep", "alpha", "alpha_dist")]
        lines += [" ".join(f"![{p}](plots/{p})" for p in plots), ""]
    return "\n".join(lines)


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


def _rolling_median(values: Sequence[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        x = sorted(v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v))
        out.append(x[len(x) // 2] if x else math.nan)
    return out


def _lr_grid_lines(ax: Any, lr_grid: Sequence[float], best_lr: float | None) -> None:
    """Adam's lr grid as labelled horizontal lines, the best lr in black."""
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


def plot_workload(
    workload: str, rows: Sequence[dict[str, Any]], logs: dict[str, dict[str, list[Any]]], folder: Path
) -> list[Path]:
    """loss_, lr_sweep_, alpha_ and alpha_dist_<workload>.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    groups = by_config(rows)
    adam = best_lr(rows, "adam")
    written = []
    styles = _line_styles(plt, 20)  # α* variants often coincide exactly: keep every line visible

    # 1. training loss curves of the headline configurations
    fig, ax = plt.subplots(figsize=(10, 5))
    shown = [
        (c, runs) for c, runs in headline(rows).items() if c[3] != "observe"
    ]  # observe = Adam's trajectory
    for i, (config, runs) in enumerate(shown):
        curves = [_ema(logs[r["run_id"]]["loss"]) for r in runs if r["run_id"] in logs]
        if not curves:
            continue
        label = runs[0]["label"] + (" (best)" if config[0] == "adam" and config[1] == adam else "")
        ax.plot(_mean_curve(curves), lw=1.6, **styles[i % len(styles)], label=label)
    ax.set(
        yscale="log",
        xlabel="step",
        ylabel="mini-batch training loss (EMA 0.95, mean over seeds)",
        title=f"{workload}: training loss",
    )
    _legend(ax)
    written.append(_save(fig, folder / f"loss_{workload}.png"))

    # 2. final training loss against Adam's (and SGD's) lr, with alpha* and the peers as levels
    fig, ax = plt.subplots(figsize=(10, 5))
    for name, marker in (("adam", "o"), ("sgd", "s")):
        points = [
            (c[1], *mean_std([r["final_train_loss"] for r in runs if r["status"] == "ok"])[:2])
            for c, runs in groups.items()
            if c[0] == name and not c[3]
        ]
        points = [p for p in points if math.isfinite(p[1])]
        if points:
            xs, ys, es = zip(*sorted(points), strict=True)
            ax.errorbar(
                xs,
                ys,
                yerr=es,
                marker=marker,
                capsize=3,
                label=f"{'Adam' if name == 'adam' else 'SGD'}, fixed lr",
            )
    others = [(c, runs) for c, runs in headline(rows).items() if c[0] in PEERS or c[3].startswith("scale")]
    for i, (config, runs) in enumerate(others):
        ok = [r for r in runs if r["status"] == "ok"]
        mean, _, n = mean_std([r["final_train_loss"] for r in ok])
        if not n:
            continue
        style = styles[(i + 2) % len(styles)]
        label = runs[0]["label"]
        if config[3].startswith("scale"):  # a star where the median α it used sits on the lr axis
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
    _legend(ax)
    written.append(_save(fig, folder / f"lr_sweep_{workload}.png"))

    # 3. alpha* over steps against Adam's lr grid
    quad = [(c, runs) for c, runs in groups.items() if c[0] == "quadstep_adam"]
    lr_grid = sorted({c[1] for c in groups if c[0] == "adam"})
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, (_, runs) in enumerate(quad):
        curves = [_alpha_star(logs[r["run_id"]]) for r in runs if r["run_id"] in logs]
        curves = [c for c in curves if any(math.isfinite(v) for v in c)]
        if curves:
            medians = _median_curve(curves)
            ax.plot(
                _rolling_median(medians, max(len(medians) // 50, 5)),
                lw=1.4,
                **styles[i % len(styles)],
                label=runs[0]["label"],
            )
    _lr_grid_lines(ax, lr_grid, adam)
    ax.set(
        yscale="log",
        xlabel="step",
        ylabel="α* (rolling median over steps, median over seeds)",
        title=f"{workload}: α* over steps against Adam's learning-rate grid",
    )
    _legend(ax)
    written.append(_save(fig, folder / f"alpha_{workload}.png"))

    # 4. the step size each policy used (scale mode) or proposed (observe mode) against the lr grid
    fig, ax = plt.subplots(figsize=(10, 5))
    k = 0
    for config, runs in quad:
        columns = ["alpha"] if config[3].startswith("scale") else [f"{p}.alpha" for p in POLICY_NAMES]
        for column in columns:
            curves = [logs[r["run_id"]].get(column, []) for r in runs if r["run_id"] in logs]
            medians = _median_curve(curves)
            if not any(math.isfinite(v) for v in medians):
                continue
            label = runs[0]["label"] if column == "alpha" else f"{runs[0]['label']}: {column[:-6]} proposes"
            style = {**styles[k % len(styles)], **({} if column == "alpha" else {"ls": ":"})}
            ax.plot(_rolling_median(medians, max(len(medians) // 50, 5)), lw=1.4, **style, label=label)
            k += 1
    _lr_grid_lines(ax, lr_grid, adam)
    ax.set(
        yscale="log",
        xlabel="step",
        ylabel="α used / proposed (rolling median, median over seeds)",
        title=f"{workload}: each step-size policy's α against Adam's learning-rate grid",
    )
    _legend(ax)
    written.append(_save(fig, folder / f"policy_{workload}.png"))

    # 5. distribution of alpha*
    fig, ax = plt.subplots(figsize=(10, 5))
    samples = [
        [
            math.log10(v)
            for r in runs
            if r["run_id"] in logs
            for v in _alpha_star(logs[r["run_id"]])
            if math.isfinite(v)
        ]
        for _, runs in quad
    ]
    pooled = [v for values in samples for v in values]
    edges = None
    if pooled:  # the same bins for every variant, over the central 99% (outliers land in the end bins)
        ordered = sorted(pooled)
        low, high = ordered[int(0.005 * (len(ordered) - 1))], ordered[int(0.995 * (len(ordered) - 1))]
        edges = [low + (high - low + 1e-9) * k / 60 for k in range(61)]
    for i, ((_, runs), values) in enumerate(zip(quad, samples, strict=True)):
        if values and edges:
            values = [min(max(v, edges[0]), edges[-1]) for v in values]
            ax.hist(
                values,
                bins=edges,
                histtype="step",
                density=True,
                lw=1.4,
                ls=styles[i % len(styles)]["ls"],
                color=styles[i % len(styles)]["color"],
                label=f"{runs[0]['label']} ({len(values)} steps)",
            )
    for lr in lr_grid:
        best = lr == adam
        ax.axvline(
            math.log10(lr),
            color="black" if best else "gray",
            ls="-" if best else "--",
            lw=1.6 if best else 0.6,
        )
    ax.set(
        xlabel="log10 α*  (vertical lines: Adam lr grid, solid = best lr; outer 1% clipped)",
        ylabel="density",
        title=f"{workload}: distribution of α* over steps and seeds",
    )
    _legend(ax)
    written.append(_save(fig, folder / f"alpha_dist_{workload}.png"))
    return written


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
