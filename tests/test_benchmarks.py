"""The benchmark harness on tiny data: workloads, optimizer entries, files, report, CLI, IDX loader."""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import socket
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import quadstep
from benchmarks import data as idx
from benchmarks import overhead, report, runner, training
from benchmarks.__main__ import main
from benchmarks.submissions import ADAM_LRS, PEER_LRS, Submission, submissions
from benchmarks.workloads import DataUnavailable, all_workloads

WORKLOADS = all_workloads()


def _fake_mnist(folder: Path, n_train: int = 40, n_test: int = 20) -> dict[str, np.ndarray]:
    """Four IDX files in the MNIST layout: images gzipped, labels raw, one with the '.idx' spelling."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels.idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        idx.write_idx(folder / name, array, compress=name.endswith(".gz"))
    return arrays


@pytest.fixture
def fake_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    arrays = _fake_mnist(tmp_path / "idx")
    monkeypatch.setenv(idx.DATA_DIR_ENV, str(tmp_path / "idx"))
    monkeypatch.setattr(idx, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    return arrays


# ---------------------------------------------------------------- IDX loader


def test_read_idx_hand_written_header(tmp_path: Path) -> None:
    """A file whose header is packed by hand (not by write_idx): uint8 and big-endian int32/float32."""
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(struct.pack(">BBBBIII", 0, 0, 0x08, 3, 2, 3, 4) + images.tobytes())
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "a"), images)

    values = np.array([-7, 0, 123456], dtype=np.int32)
    (tmp_path / "b.gz").write_bytes(
        gzip.compress(struct.pack(">BBBBI", 0, 0, 0x0C, 1, 3) + values.astype(">i4").tobytes())
    )
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "b.gz"), values)

    floats = np.array([[1.5, -2.25]], dtype=np.float32)
    (tmp_path / "c").write_bytes(struct.pack(">BBBBII", 0, 0, 0x0D, 2, 1, 2) + floats.astype(">f4").tobytes())
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "c"), floats)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path: Path, dtype: type, compress: bool) -> None:
    array = (np.arange(30) - 10).reshape(5, 6).astype(dtype)
    idx.write_idx(tmp_path / "x", array, compress=compress)
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "x"), array)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        idx.read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(struct.pack(">BBBBI", 0, 0, 0x08, 1, 10) + b"\x00" * 9)
    with pytest.raises(ValueError, match="header says shape"):
        idx.read_idx(tmp_path / "short")


def test_image_classification_reads_and_standardises(fake_data_dir: dict[str, np.ndarray]) -> None:
    arrays = idx.image_classification(None, None)
    raw = fake_data_dir["train-images-idx3-ubyte.gz"].astype(np.float64) / 255
    assert arrays["x_train"].shape == (40, 1, 28, 28) and arrays["x_test"].shape == (20, 1, 28, 28)
    expected = (raw - raw.mean()) / raw.std(ddof=1)
    np.testing.assert_allclose(arrays["x_train"][:, 0].numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(arrays["y_train"].numpy(), fake_data_dir["train-labels.idx1-ubyte"])
    np.testing.assert_array_equal(arrays["y_test"].numpy(), fake_data_dir["t10k-labels-idx1-ubyte"])
    assert arrays["y_train"].dtype == torch.int64
    assert len(idx.image_classification(8, 4)["y_test"]) == 4


def test_missing_data_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(idx.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(idx, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DataUnavailable, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        WORKLOADS["fmnist_mlp"].load_data(0, "tiny")


# ---------------------------------------------------------------- workloads and optimizer entries


def _finite_row(row: dict) -> None:
    assert row["status"] == "ok", row
    for key in ("initial_train_loss", "final_train_loss", "test_loss", "seconds_per_step"):
        assert math.isfinite(row[key]), (key, row)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_each_workload_trains(name: str, fake_data_dir: dict[str, np.ndarray]) -> None:
    workload = WORKLOADS[name]
    data = workload.load_data(0, "tiny")
    assert len(data.x_train) == len(data.y_train) > 0 and len(data.x_test) == len(data.y_test) > 0
    # observe mode: BackPACK's products on every layer of the model, along Adam's (sane) trajectory
    sub = (
        Submission("quadstep_adam", 1e-3, "hessian", "observe")
        if workload.backpack
        else Submission("adam", 1e-3)
    )
    result = runner.train_run(workload, data, sub, seed=0, steps=workload.steps["tiny"])
    _finite_row(result.row)
    assert result.row["steps"] == workload.steps["tiny"] == len(result.log)
    if sub.is_quadstep:
        assert all(math.isfinite(r[k]) for r in result.log for k in ("alpha_star", "dg", "dHd"))
    accuracy = result.row["test_accuracy"]
    assert (accuracy is None) == (workload.loss == "mse")
    if accuracy is not None:
        assert 0.0 <= accuracy <= 1.0


@pytest.mark.parametrize("sub", submissions(backpack_ok=True), ids=lambda s: s.slug)
def test_each_optimizer_entry_runs(sub: Submission) -> None:
    """Every entry is stable for a few steps on the quadratic (top curvature 1.2 < 2 / SGD's top lr)."""
    workload = WORKLOADS["quadratic"]
    steps = 4 if sub.every == 1 else sub.every + 2  # past the second measuring step
    result = runner.train_run(workload, workload.load_data(0, "tiny"), sub, seed=0, steps=steps)
    _finite_row(result.row)
    assert all(math.isfinite(r["loss"]) for r in result.log)
    if sub.is_quadstep:  # Q is positive definite and θ far from the optimum: the model has a minimum
        # d_t is formed where it is queried (greedy, corrected, observe) or kept for a lagged query next
        observe = sub.mode == "observe"
        current, kept = observe or sub.step_size != "lagged", observe or sub.step_size == "lagged"
        formed = {
            t
            for t in range(1, steps + 1)
            if (current and (t - 1) % sub.every == 0) or (kept and t % sub.every == 0)
        }
        assert {r["step"] for r in result.log if math.isfinite(r["dg"])} == formed
        assert all(r["dg"] < 0 for r in result.log if r["step"] in formed)
        assert all(math.isfinite(r["alpha"]) for r in result.log)
        # the curvature along d_t (greedy, observe) or d_{t-1} (lagged, from step 2), on measuring steps
        lagged = sub.mode == "scale" and sub.step_size == "lagged"
        key, status = ("lagged_dHd", "policy_status") if lagged else ("dHd", "status")
        measuring = [
            r for r in result.log if (r["step"] - 1) % sub.every == 0 and (not lagged or r["step"] > 1)
        ]
        assert measuring and all(r[key] > 0 and r[status] in report.DEFINED for r in measuring)
        if not lagged and sub.every == 1:
            assert result.row["alpha_star_defined"] == 1.0


def test_submission_grid_covers_the_issue() -> None:
    subs = submissions(backpack_ok=True)
    adam = sorted(s.lr for s in subs if s.optimizer == "adam")
    assert len(adam) >= 7 and adam[0] == pytest.approx(1e-4) and adam[-1] >= 1e-1
    import quadstep

    assert {s.curvature for s in subs if s.mode == "scale"} == set(quadstep.CURVATURES)
    assert {"prodigy", "dadapt_adam", "schedulefree_adamw", "sgd"} <= {s.optimizer for s in subs}
    assert not any(s.backpack for s in submissions(backpack_ok=False))


def test_observe_mode_follows_torch_adam() -> None:
    """Observe mode on an extended model takes torch.optim.Adam's steps on the plain model: same losses."""
    workload = WORKLOADS["digits"]
    data = workload.load_data(0, "tiny")
    adam = runner.train_run(workload, data, Submission("adam", 3e-3), seed=1, steps=6)
    observe = runner.train_run(
        workload, data, Submission("quadstep_adam", 3e-3, "hessian", "observe"), seed=1, steps=6
    )
    np.testing.assert_allclose([r["loss"] for r in observe.log], [r["loss"] for r in adam.log], rtol=1e-5)
    assert observe.row["final_train_loss"] == pytest.approx(adam.row["final_train_loss"], rel=1e-5)


def test_quadratic_optimum_is_the_minimum() -> None:
    """At θ = R⁻¹ ȳ (solved independently) the test loss equals `optimum` and its gradient vanishes."""
    workload = WORKLOADS["quadratic"]
    data = workload.load_data(0, "tiny")
    model = workload.make_model()
    root = model[1].weight.detach().double()
    theta = torch.linalg.solve(root, data.y_test.double().mean(0))
    with torch.no_grad():
        model[0].weight.copy_(theta[:, None].float())
    loss = torch.nn.functional.mse_loss(model(data.x_test), data.y_test)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(workload.optimum(data), rel=1e-4)
    assert model[0].weight.grad.abs().max() < 1e-4
    eigenvalues = torch.linalg.eigvalsh(root.T @ root)
    assert (eigenvalues > 0).all() and eigenvalues.max() > 30 > eigenvalues[-11]


def test_divergence_and_failure_are_recorded() -> None:
    workload = WORKLOADS["regression"]
    data = workload.load_data(0, "tiny")
    diverged = runner.safe_run(workload, data, Submission("sgd", 1e8), seed=0, steps=20)
    assert diverged.row["status"] == "diverged"
    failed = runner.safe_run(workload, data, Submission("no_such_optimizer", 1.0), seed=0, steps=2)
    assert failed.row["status"] == "failed" and "no_such_optimizer" in failed.row["error"]


# ---------------------------------------------------------------- files, report, CLI


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cli_writes_every_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_mnist(tmp_path / "idx")
    monkeypatch.setattr(idx, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setenv(idx.DATA_DIR_ENV, str(tmp_path / "empty"))  # --data-dir must win; restored afterwards
    out = tmp_path / "out"
    argv = ["--tiny", "--data-dir", str(tmp_path / "idx"), "--out", str(out), "--no-progress"]
    argv += "--seeds 0 1 --optimizers adam quadstep_adam --curvatures ggn".split()
    argv += ["--workloads", "quadratic", "fmnist_linear"]
    assert main(argv) == 0

    rows = _read_csv(out / "results.csv")
    assert set(runner.RESULT_COLUMNS) <= set(rows[0])
    assert {r["workload"] for r in rows} == {"quadratic", "fmnist_linear"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 2 * 2 * len(ADAM_LRS)  # every Adam lr, both seeds, both workloads
    for r in ok:
        for key in ("final_train_loss", "test_loss", "seconds_per_step"):
            assert math.isfinite(float(r[key]))
        assert (r["test_accuracy"] == "") == (r["workload"] == "quadratic")
    for workload in ("quadratic", "fmnist_linear"):
        log = _read_csv(out / "logs" / f"{workload}.csv")
        assert set(runner.LOG_COLUMNS) == set(log[0])
        quad = [r for r in log if "quadstep" in r["run_id"]]
        assert quad and all(math.isfinite(float(r[k])) for r in quad for k in ("loss", "alpha"))
        # d_t is formed on every step of every=1 (on those of every=k only where it is queried or kept)
        assert all(math.isfinite(float(r["dg"])) for r in quad if "_every" not in r["run_id"])
        # every step queries d_t: greedy and corrected every step, and observe mode
        current = [
            r
            for r in quad
            if r["run_id"].endswith(("_greedy__s0", "_greedy__s1", "_corrected__s0", "_corrected__s1"))
            or "_observe_" in r["run_id"]
        ]
        assert current and all(math.isfinite(float(r["dHd"])) for r in current)
        lagged = [
            r for r in quad if r["run_id"].endswith(("_lagged__s0", "_lagged__s1")) and int(r["step"]) > 1
        ]
        assert lagged and all(math.isfinite(float(r["lagged_dHd"])) for r in lagged)

    text = (out / "metadata.json").read_text()
    meta = json.loads(text)
    assert meta["versions"]["torch"] == torch.__version__ and meta["git_commit"]
    assert meta["workloads"]["quadratic"]["optimum_test_loss"] > 0
    assert socket.gethostname() not in text

    summary = (out / "summary.md").read_text()
    assert "## quadratic" in summary and "α* scale ggn" in summary and "Best Adam lr" in summary
    assert not any(r["curvature"] not in ("", "ggn") for r in rows) and any(
        r["mode"] == "observe" for r in rows
    )
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert len(plots) == 10 and all((out / "plots" / p).stat().st_size > 5000 for p in plots)

    (out / "summary.md").unlink()
    assert main(["report", "--out", str(out)]) == 0
    assert (out / "summary.md").read_text() == summary


def test_missing_workload_data_does_not_stop_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(idx.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(idx, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    out = tmp_path / "out"
    rows = runner.run(
        [WORKLOADS["fmnist_cnn"], WORKLOADS["regression"]],
        "tiny",
        [0],
        out,
        optimizers=["adam"],
        progress=False,
    )
    assert {r["workload"] for r in rows} == {"regression"}
    meta = json.loads((out / "metadata.json").read_text())
    assert "dataset-fashion-mnist" in meta["skipped_workloads"]["fmnist_cnn"]


def test_best_lr_ignores_diverged_configs() -> None:
    def row(lr: float, loss: float, status: str = "ok") -> dict:
        return {
            "optimizer": "adam",
            "lr": lr,
            "curvature": "",
            "mode": "",
            "final_train_loss": loss,
            "status": status,
        }

    rows = [
        row(1e-3, 0.5),
        row(1e-3, 0.7),
        row(1e-2, 0.1),
        row(1e-2, 0.2, "diverged"),
        row(1e-4, 0.55),
        row(1e-4, 0.6),
    ]
    assert report.best_lr(rows, "adam") == 1e-4 + 0  # 1e-2 has a diverged seed; mean 0.575 < 0.6
    assert report.mean_std([1.0, 3.0, None, math.nan]) == (2.0, math.sqrt(2.0), 2)


def test_reference_summary_regenerates_from_its_files() -> None:
    """The committed reference summary.md is what the report makes of its results.csv and metadata.json."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "reference"
    rows = report.read_results(folder / "results.csv")
    meta = json.loads((folder / "metadata.json").read_text())
    assert report.summary_markdown(rows, meta) == (folder / "summary.md").read_text()


def test_report_labels_come_from_the_data() -> None:
    """A peer and an lr grid the report has never heard of get their rows and columns, by their labels."""

    def row(optimizer: str, label: str, lr: float, mode: str = "", loss: float = 0.5) -> dict:
        return {
            "workload": "w", "optimizer": optimizer, "label": label, "lr": lr, "mode": mode,
            "curvature": "ggn" if mode else "", "step_size": "", "every": 1, "status": "ok",
            "final_train_loss": loss, "test_loss": loss, "test_accuracy": 0.9, "seconds_per_step": 0.01,
            "alpha_star_median": 0.01, "alpha_median": 0.01, "alpha_star_defined": 1.0, "run_id": label,
        }  # fmt: skip

    rows = [
        row("adam", "Adam lr=0.001", 1e-3), row("adam", "Adam lr=0.01", 1e-2, loss=0.4),
        row("lion", "Lion lr=0.0001", 1e-4), row("lion", "Lion lr=0.001", 1e-3, loss=0.6),
        row("muon", "Muon", 0.02), row("quadstep_adam", "α* scale ggn", 1e-3, "scale"),
    ]  # fmt: skip
    head = report.overview(rows, {})[0]
    assert head == "| workload | Adam, best lr | α* scale ggn | Muon | Lion, best lr |"
    assert [(c[0], c[1]) for c in report.headline(rows)] == [
        ("adam", 1e-3), ("adam", 1e-2), ("quadstep_adam", 1e-3), ("muon", 0.02), ("lion", 1e-4)
    ]  # fmt: skip
    assert "| Muon | lr 0.02 (default) |" in report.summary_markdown(rows, {})


def test_the_submission_owns_schedule_free_modes() -> None:
    """Schedule-Free steps in its training mode; the loop leaves it in its evaluation mode."""
    workload = WORKLOADS["regression"]
    data = workload.load_data(0, "tiny")
    trainer = Submission("schedulefree_adamw", 0.0025).init(workload.make_model(), torch.nn.MSELoss())
    batches = training.minibatches(data.x_train, data.y_train, workload.batch_size, seed=0)
    modes = [trainer.optimizer.param_groups[0]["train_mode"] for _ in training.train(trainer, batches, 2)]
    losses, _ = training.fit(trainer, batches, 2)
    assert modes == [True, True] and len(losses) == 2
    assert not trainer.optimizer.param_groups[0]["train_mode"]


# ---------------------------------------------------------------- probe subcommand


def test_probe_summary_by_hand() -> None:
    from benchmarks.probe import summarize

    def step(seed: int, alpha: float, dhd: float = 1.0) -> dict[str, object]:
        row = {"workload": "w", "label": "SGD", "lr": 0.1, "seed": seed}
        return {**row, "alpha_star": alpha, "dg": -alpha * dhd, "dHd": dhd}

    steps = [step(0, 0.5), step(0, 2.0), step(0, -1.0), step(1, 4.0), step(1, 3.0), step(1, 9.0, dhd=-1.0)]
    runs = [{"workload": "w", "label": "SGD", "final_train_loss": v} for v in (1.0, 3.0)]
    (row,) = summarize(runs, steps)
    # steps with a minimum (sᵀCs > 0): 0.5, 2, -1 (seed 0) and 4, 3 (seed 1); median 2
    assert row["alpha_star_median"] == 2.0
    assert row["seed_medians"] == (0.5, 3.5)
    assert row["past_minimum"] == pytest.approx(2 / 5) and row["uphill"] == pytest.approx(1 / 5)
    assert row["no_minimum"] == pytest.approx(1 / 6)
    assert row["final_train_loss"] == 2.0 and row["lr"] == 0.1 and row["steps"] == 6


def test_probe_subcommand_writes_steps_table_and_plot(tmp_path: Path) -> None:
    from benchmarks.probe import write_report

    out = tmp_path / "probe"
    assert main(["probe", "--tiny", "--workloads", "quadratic", "--seeds", "0", "--out", str(out)]) == 0
    with (out / "steps.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    labels = ["Adam", "SGD", "Prodigy", "D-Adapt Adam", "Schedule-Free AdamW"]
    steps = WORKLOADS["quadratic"].steps["tiny"]
    assert [r["label"] for r in rows] == [label for label in labels for _ in range(steps)]
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1)) * len(labels)
    sgd = [r for r in rows if r["label"] == "SGD"]
    # SGD steps s = -lr·g: sᵀg = -lr·gᵀg < 0 and α* = -sᵀg / sᵀCs
    assert all(float(r["dg"]) < 0 for r in sgd)
    for r in sgd:
        assert float(r["alpha_star"]) == pytest.approx(-float(r["dg"]) / float(r["dHd"]), rel=1e-6)
    table = (out / "summary.md").read_text()
    assert all(f"| quadratic | {label} |" in table for label in labels)
    assert "`python -m benchmarks probe --tiny --workloads quadratic --seeds 0 --out" in table
    assert (out / "probe.png").stat().st_size > 10_000
    (out / "summary.md").unlink()
    write_report(out)  # the table again, from the run's files alone
    assert (out / "summary.md").read_text() == table
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["config"]["curvature"] == "ggn-exact" and meta["workloads"]["quadratic"]["steps"] == steps


@pytest.mark.slow
def test_overhead_benchmark_writes_its_table(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmarks overhead`` on a tiny setting: one row per contender, finite ratios, and
    none of the profiler's start/stop lines on stderr."""
    overhead.main(
        ["--depths", "2", "--no-cnn", "--rounds", "2", "--steps", "1", "--warmup", "0",
         "--memory-steps", "1", "--threads", "1", "--clock", "cpu", "--policies", "lagged@2",
         "--out", str(tmp_path)]
    )  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "overhead.csv", encoding="utf-8")))
    assert tuple(rows[0]) == overhead.COLUMNS
    assert [r["optimizer"] for r in rows] == ["adam", "adam-fused"] + ["quadstep"] * len(quadstep.CURVATURES)
    assert [r["curvature"] for r in rows[2:]] == list(quadstep.CURVATURES)
    assert [r["policy"] for r in rows] == ["", ""] + ["lagged@2"] * len(quadstep.CURVATURES)
    assert rows[0]["time_ratio_median"] == "1.000" and rows[0]["peak_ratio"] == "1.000"
    for r in rows:
        for column in overhead.COLUMNS[4:]:
            assert math.isfinite(float(r[column])) and float(r[column]) > 0
    assert (tmp_path / "overhead.md").read_text().count("| mlp-depth2 |") == len(rows)
    assert (tmp_path / "overhead_metadata.json").exists()
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "ActivityProfiler" not in err


def test_profiler_lines_dropped_and_everything_else_kept(capfd: pytest.CaptureFixture[str]) -> None:
    with overhead._without_profiler_lines():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True):
            torch.randn(3)
        os.write(2, b"a line of our own\n")
        print("via sys.stderr", file=sys.stderr)
    err = capfd.readouterr().err
    assert sorted(err.splitlines()) == ["a line of our own", "via sys.stderr"]


def test_progress_bar_total_is_fixed_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar's total is known before the first run and never changes; it ends full, also for a
    workload whose data is missing and for an observe-best stage that is not needed."""
    import tqdm

    seen: list[tuple[int, float]] = []

    class Recording(tqdm.tqdm):
        def update(self, n: float = 1) -> bool | None:
            seen.append((self.total, self.n))
            out = super().update(n)
            seen.append((self.total, self.n))
            return out

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    monkeypatch.setenv(idx.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(idx, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    rows = runner.run(
        [WORKLOADS["quadratic"], WORKLOADS["fmnist_mlp"], WORKLOADS["regression"]], "tiny", [0, 1],
        tmp_path / "out", steps=2, optimizers=["adam", "quadstep_adam"], curvatures=["ggn-exact"],
    )  # fmt: skip
    totals = {total for total, _ in seen}
    assert len(totals) == 1
    (total,) = totals
    assert seen[-1][1] == total > 0
    assert 0 < len(rows) < total  # the missing workload's runs and the stages not needed counted as done


def test_plots_keep_twelve_identical_curves_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve configurations with the very same curves: every line gets its own colour and marker."""
    pytest.importorskip("matplotlib")
    configs = [("adam", 1e-3, "", ""), ("adam", 1e-2, "", ""), ("sgd", 0.1, "", "")]
    configs += [(peer, 1.0, "", "") for peer in PEER_LRS]
    configs += [("quadstep_adam", 1e-3, c, "scale") for c in quadstep.CURVATURES]
    rows, logs = [], {}
    for i, (name, lr, curvature, mode) in enumerate(configs):
        rows.append({
            "workload": "w", "optimizer": name, "lr": lr, "curvature": curvature, "mode": mode,
            "label": f"{name} {lr} {curvature}", "run_id": str(i), "status": "ok",
            "final_train_loss": 0.5 - 0.01 * (name == "adam" and lr == 1e-2), "alpha_median": 0.01,
        })  # fmt: skip
        logs[str(i)] = {"loss": [1.0 / (t + 1) for t in range(200)], "alpha_star": [0.01] * 200,
                        "status": ["ok"] * 200}  # fmt: skip
    figures = {}

    def keep(fig, path: Path) -> Path:  # noqa: ANN001
        figures[path.name] = fig
        return path

    monkeypatch.setattr(report, "_save", keep)
    report.plot_workload("w", rows, logs, tmp_path)
    import matplotlib.pyplot as plt

    for name, lines in [
        ("loss_w.png", 12),
        ("alpha_w.png", len(quadstep.CURVATURES)),
    ]:
        drawn = [line for line in figures[name].axes[0].get_lines() if not line.get_label().startswith("_")]
        assert len(drawn) == lines
        assert len({line.get_color() for line in drawn}) == lines
        assert len({line.get_marker() for line in drawn}) == lines
        assert len({str(line.get_markevery()) for line in drawn}) == lines  # markers don't sit on each other
    sweep = [line for line in figures["lr_sweep_w.png"].axes[0].get_lines() if line.get_label()[0] != "_"]
    assert len({line.get_color() for line in sweep}) == len(sweep)
    for fig in figures.values():
        plt.close(fig)
