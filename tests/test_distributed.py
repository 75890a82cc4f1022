"""Data parallel: DDP (gloo, CPU, 2 processes) + BackPACK + QuadraticLineSearchAdam, and StepProbe.

DDP averages gradients, so d and dᵀg agree across ranks; each rank's BackPACK
curvature covers its local batch, and the optimizer averages dᵀCd over the ranks.
With equal local batches that is the curvature of the global batch's mean loss, so
a 2-rank run over the two halves of every batch must equal a 1-process run over
the whole batch, and the replicas must stay identical.

Every test spawns real processes; a collective that hangs fails through the
process-group timeout and the join deadline, never blocks CI.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from backpack import backpack, extend
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from quadstep import QuadraticLineSearchAdam, StepProbe
from quadstep.records import COLUMNS

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
BATCH = 16
WORLD = 2
DEADLINE_S = 240  # whole spawn, startup included; a hang fails here
COLLECTIVE_TIMEOUT = timedelta(seconds=90)

# name -> (local batch sizes per rank, loss reduction, mode, average dCd over ranks, eps on each rank);
# mode "scale" steps with step_size="greedy", "lagged" and "corrected" (scale mode) with those policies
CONFIGS: dict[str, tuple[tuple[int, ...], str, str, bool, float]] = {
    "scale": ((8, 8), "mean", "scale", True, 1e-8),
    "lagged": ((8, 8), "mean", "lagged", True, 1e-8),  # scale mode, step_size="lagged"
    "corrected": ((8, 8), "mean", "corrected", True, 1e-8),  # per-sample statistics of both ranks
    "observe": ((8, 8), "mean", "observe", True, 1e-8),
    "scale-no-average": ((8, 8), "mean", "scale", False, 1e-8),
    "unequal-mean": ((5, 11), "mean", "scale", True, 1e-8),
    # reduction="sum" makes every rank's loss (1/R)·(its share of the global sum) after
    # DDP's averaging: g and C are the 1-process sum's over R; eps/R keeps Adam's d exact.
    "unequal-sum": ((5, 11), "sum", "scale", True, 1e-8 / WORLD),
}


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def make_batches(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 5, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen)) for _ in range(STEPS)]


def train(name: str, rank: int, world: int) -> dict[str, Any]:
    """Run config ``name`` for STEPS steps on this rank's part of every batch (the whole batch if world=1).

    Returns the per-step records and flattened parameters.
    """
    sizes, reduction, mode, average, eps = CONFIGS[name]
    if world == 1:  # the reference: one process, whole batch, eps of the 1-process run
        eps = CONFIGS[name][4] * (WORLD if reduction == "sum" else 1)
    inner = extend(make_model())
    model = DDP(inner) if world > 1 else inner
    loss_fn = extend(nn.CrossEntropyLoss(reduction=reduction))
    policy = {"step_size": mode if mode in ("lagged", "corrected") else "greedy", "alpha_max": 1.0}
    mode = "scale" if mode in ("lagged", "corrected") else mode
    opt = QuadraticLineSearchAdam(model.parameters(), lr=1e-2, eps=eps, curvature="hessian", mode=mode, **policy)
    if not average:
        opt._average_over_ranks = lambda values: values  # what happens without the all-reduce
    start = sum(sizes[:rank]) if world > 1 else 0
    stop = start + sizes[rank] if world > 1 else BATCH
    params, records, all_reduces = [], [], 0
    all_reduce = dist.all_reduce  # DDP's own gradient all-reduces run in C++, not through this

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal all_reduces
        all_reduces += 1
        return all_reduce(*args, **kwargs)

    for x, y in make_batches():
        opt.zero_grad()
        loss = loss_fn(model(x[start:stop]), y[start:stop])
        with backpack(opt.extension()):
            loss.backward()
        dist.all_reduce = counted
        try:
            opt.step()
        finally:
            dist.all_reduce = all_reduce
        params.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
        records.append(opt.history[-1].as_dict())
    return {"params": torch.stack(params), "records": records, "all_reduces": all_reduces}


def train_probe(rank: int, world: int) -> dict[str, Any]:
    """torch.optim.SGD with momentum under a StepProbe (BackPACK's Hessian) on this rank's half of
    every batch (the whole batch if world=1): the records, the parameters and the all-reduces of
    the probe's steps."""
    inner = extend(make_model())
    model = DDP(inner) if world > 1 else inner
    loss_fn = extend(nn.CrossEntropyLoss())
    probe = StepProbe(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "hessian")
    half = BATCH // WORLD
    start, stop = (rank * half, (rank + 1) * half) if world > 1 else (0, BATCH)
    params, all_reduces = [], 0
    all_reduce = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal all_reduces
        all_reduces += 1
        return all_reduce(*args, **kwargs)

    for x, y in make_batches():
        probe.optimizer.zero_grad()
        loss = loss_fn(model(x[start:stop]), y[start:stop])
        with backpack(probe.extension()):
            loss.backward()
        dist.all_reduce = counted
        try:
            probe.step()
        finally:
            dist.all_reduce = all_reduce
        params.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    records = [r.as_dict() for r in probe.history]
    return {"params": torch.stack(params), "records": records, "all_reduces": all_reduces}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        results = {name: train(name, rank, world) for name in CONFIGS}
        results["probe"] = train_probe(rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Free DDP's reducers (held in reference cycles) while the interpreter is alive, then leave
        # together: gloo work destroyed at interpreter exit, or under a working peer, aborts a rank.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world: int, tmp: Path) -> list[dict[str, Any]]:
    """Run :func:`_worker` on ``world`` spawned processes; fail (and kill them) after DEADLINE_S."""
    ctx = mp.start_processes(
        _worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world, join=False, start_method="spawn"
    )
    end = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > end:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"distributed workers did not finish within {DEADLINE_S} s (hang?)")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("ddp")
    ranks = spawn(WORLD, tmp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            single = {name: train(name, 0, 1) for name in CONFIGS}
            single["probe"] = train_probe(0, 1)
    finally:
        torch.set_num_threads(threads)
    return {"ranks": ranks, "single": single}


def record_column(records: list[dict[str, Any]], key: str) -> torch.Tensor:
    return torch.tensor([r[key] for r in records], dtype=torch.float64)


@pytest.mark.parametrize("name", ["scale", "lagged", "corrected", "observe", "unequal-mean", "unequal-sum"])
def test_ranks_take_identical_steps(runs: dict[str, Any], name: str) -> None:
    r0, r1 = (runs["ranks"][r][name] for r in range(WORLD))
    assert torch.equal(r0["params"], r1["params"])
    assert repr(r0["records"]) == repr(r1["records"])  # bit for bit: repr round-trips floats, NaN included


def test_one_all_reduce_per_step(runs: dict[str, Any]) -> None:
    for rank in range(WORLD):
        for name, config in CONFIGS.items():
            averaged, first = config[3], 1 if config[2] == "lagged" else 0  # lagged: no query on step 1
            assert runs["ranks"][rank][name]["all_reduces"] == (STEPS - first if averaged else 0), name
    assert all(run["all_reduces"] == 0 for run in runs["single"].values())  # no process group


@pytest.mark.parametrize("name", ["scale", "lagged", "corrected", "observe", "unequal-sum"])
def test_two_ranks_match_one_process_over_the_whole_batch(runs: dict[str, Any], name: str) -> None:
    ddp, single = runs["ranks"][0][name], runs["single"][name]
    # float32 rounding (gradient all-reduce order, dCd averaging), carried through 20 steps;
    # measured here: up to 2e-5 (scale), 6e-8 (observe). Without averaging: 7.7.
    torch.testing.assert_close(ddp["params"], single["params"], rtol=1e-4, atol=5e-5)
    # with reduction="sum", each rank's g and C are the 1-process sum's over R
    factor = WORLD if CONFIGS[name][1] == "sum" else 1
    forms = ("slope", "lagged_dHd") if name == "lagged" else ("alpha_star", "dHd")
    for key, f in ((forms[0], 1 if name != "lagged" else factor), ("alpha", 1), ("dg", factor), (forms[1], factor)):
        torch.testing.assert_close(
            f * record_column(ddp["records"], key), record_column(single["records"], key), rtol=1e-3, atol=1e-6,
            equal_nan=True,  # the lagged slope and curvature of step 1 do not exist (NaN) on either side
        )
    assert [r["status"] for r in ddp["records"]] == [r["status"] for r in single["records"]]
    if CONFIGS[name][2] == "lagged":  # the lagged alpha (clipped to [0, 1]) drove the steps after the first
        assert sum(r["policy_status"] in ("ok", "clipped-max", "clipped-min") for r in single["records"]) >= STEPS - 3
    if CONFIGS[name][2] == "corrected":  # the noise estimate over both ranks' samples is the whole batch's
        torch.testing.assert_close(
            record_column(ddp["records"], "corrected.numerator"),
            record_column(single["records"], "corrected.numerator"),
            rtol=1e-3,
            atol=1e-6,
        )
        assert sum(r["policy_status"] in ("ok", "clipped-max", "clipped-min") for r in single["records"]) >= STEPS - 3
    if CONFIGS[name][2] == "scale":  # alpha* (clipped to [0, 1]) really drove the steps
        defined = [r["status"] in ("ok", "clipped-max", "clipped-min") for r in single["records"]]
        assert sum(defined) >= STEPS - 3


def test_without_averaging_the_replicas_diverge(runs: dict[str, Any]) -> None:
    """The reason for the all-reduce: local curvature → a different alpha on each rank."""
    r0, r1 = (runs["ranks"][r]["scale-no-average"] for r in range(WORLD))
    reference = runs["single"]["scale"]["records"][0]
    # step 1 starts from identical parameters and an identical d (DDP-averaged g):
    # the local dᵀCd differ, and their mean is the whole batch's
    local = torch.tensor([r0["records"][0]["dHd"], r1["records"][0]["dHd"]], dtype=torch.float64)
    assert abs(local[0] - local[1]) > 1e-3 * abs(local).max()
    torch.testing.assert_close(local.mean(), torch.tensor(reference["dHd"], dtype=torch.float64), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(r0["params"][-1], r1["params"][-1], rtol=1e-3, atol=1e-4)


def test_step_probe_averages_the_curvature_over_ranks_in_one_all_reduce(runs: dict[str, Any]) -> None:
    """Two ranks over the halves of every batch record what one process records over the whole batch."""
    r0, r1 = (runs["ranks"][r]["probe"] for r in range(WORLD))
    single = runs["single"]["probe"]
    assert repr(r0["records"]) == repr(r1["records"]) and torch.equal(r0["params"], r1["params"])
    assert r0["all_reduces"] == r1["all_reduces"] == STEPS and single["all_reduces"] == 0
    torch.testing.assert_close(r0["params"], single["params"], rtol=1e-4, atol=5e-5)
    for key in ("alpha_star", "dg", "dHd"):
        torch.testing.assert_close(
            record_column(r0["records"], key), record_column(single["records"], key), rtol=1e-3, atol=1e-6
        )
    assert [r["status"] for r in r0["records"]] == [r["status"] for r in single["records"]]
    assert sum(r["status"] == "ok" for r in single["records"]) >= STEPS - 3


def mean_of_means_reference(sizes: tuple[int, ...], eps: float) -> tuple[float, float]:
    """dᵀg and block-diagonal dᵀHd at step 1 for the loss (1/R) Σ_r mean_{i∈r} ℓ_i, by autograd."""
    model = make_model()
    x, y = make_batches()[0]
    bounds = torch.tensor((0, *sizes)).cumsum(0).tolist()
    loss = sum(
        nn.functional.cross_entropy(model(x[a:b]), y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])
    ) / len(sizes)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    # Adam at t = 1: m̂ = g, v̂ = g², so d = -g / (|g| + eps)
    ds = [-(g / (g.abs() + eps)).detach() for g in grads]
    dg = sum((d * g).sum() for d, g in zip(ds, grads))
    dhd = 0.0
    for p, g, d in zip(params, grads, ds):
        (hd,) = torch.autograd.grad((g * d).sum(), p, retain_graph=True)  # H_pp d_p
        dhd += (hd * d).sum()
    return float(dg.detach()), float(dhd.detach())


def test_unequal_local_batches_give_the_step_of_the_mean_of_rank_means(runs: dict[str, Any]) -> None:
    """What holds with unequal local batches and reduction="mean": ranks agree (tested above),
    and the step is that of (1/R) Σ_r mean_r, not of the global batch's mean loss."""
    sizes, _, _, _, eps = CONFIGS["unequal-mean"]
    rec = runs["ranks"][0]["unequal-mean"]["records"][0]
    dg, dhd = mean_of_means_reference(sizes, eps)
    assert rec["dg"] == pytest.approx(dg, rel=1e-4)
    assert rec["dHd"] == pytest.approx(dhd, rel=1e-4)
    whole = runs["single"]["unequal-mean"]["records"][0]  # global mean over the same 16 samples
    assert abs(whole["dHd"] - rec["dHd"]) > 1e-3 * abs(rec["dHd"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_example_runs_on_two_cpu_processes(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(ROOT / "examples" / "ddp_adam.py"), "--steps", "20",
        "--out", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 process(es), 20 steps, parameters identical on every rank" in proc.stdout
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert rows[0].startswith(",".join(COLUMNS)) and len(rows) == 21
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == summary["history"]["steps"] == 20
