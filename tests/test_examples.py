"""Smoke tests of every script in examples/ (tiny settings, outputs checked), the notebook
executed with nbclient, and :mod:`quadstep.compare` against independent single-curvature runs."""

from __future__ import annotations

import copy
import csv
import gzip
import importlib.util
import json
import math
import struct
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from quadstep import QuadraticLineSearchAdam, QuadraticLineSearchSGD
from quadstep.compare import PROBE_CURVATURES, CurvatureProbe, preview_directions

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _restore_threads():
    """The examples set torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_history_csv(path: Path, steps: int) -> None:
    rows = read_csv(path)
    assert len(rows) == steps
    assert list(rows[0])[:6] == ["step", "alpha_star", "alpha", "dg", "dHd", "status"]
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    defined = [r for r in rows if r["status"] in ("ok", "clipped-max", "clipped-min")]
    lagged = [r for r in rows if r["policy_status"] in ("ok", "clipped-max", "clipped-min") and r["slope"] != "nan"]
    assert defined or lagged, "neither alpha* nor a lagged step size was ever defined"
    for r in defined:
        assert math.isfinite(float(r["alpha_star"])) and float(r["alpha_star"]) > 0
        assert math.isfinite(float(r["dHd"])) and float(r["dg"]) < 0
    for r in lagged:  # the curvature along the previous direction, from the next batch
        assert math.isfinite(float(r["lagged_dHd"])) and float(r["lagged.alpha"]) >= 0


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- examples/observe_adam_regression.py -------------------------------------------------------


@pytest.mark.slow
def test_observe_adam_regression(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("observe_adam_regression")
    summaries = example.main(
        ["--steps", "40", "--lr", "1e-3", "1e-2", "--print-every", "20", "--data", "noise",
         "--out", str(tmp_path)]
    )
    for lr in ("0.001", "0.01"):
        assert_history_csv(tmp_path / f"history_lr{lr}.csv", 40)
        s = summaries[lr]
        assert math.isfinite(s["final_loss"])
        assert all(math.isfinite(s["alpha_star"][k]) for k in ("max", "min", "mean", "std"))
        assert s["alpha"]["max"] == pytest.approx(float(lr))  # observe mode: Adam's own lr every step
    assert_png(tmp_path / "alpha_star.png")
    assert json.loads((tmp_path / "summary.json").read_text()).keys() == summaries.keys()
    printed = capsys.readouterr().out
    assert printed.count("alpha_star: max") == 4  # every 20 steps (step 20) and at the end, per lr


@pytest.mark.slow
def test_observe_adam_regression_follows_torch_adam(tmp_path: Path) -> None:
    """The example's observe-mode run is Adam's run: the same final loss as torch.optim.Adam in its loop."""
    example = load_example("observe_adam_regression")
    summaries = example.main(
        ["--steps", "25", "--lr", "1e-2", "--print-every", "100", "--out", str(tmp_path)]
    )
    x, y = example.make_data("linear", 1000, 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    for step in range(25):
        idx = order[32 * step : 32 * (step + 1)]
        opt.zero_grad()
        nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        expected = nn.functional.mse_loss(model(x), y).item()
    assert summaries["0.01"]["final_loss"] == pytest.approx(expected, rel=1e-5)


# --- examples/compare_curvatures.py and quadstep.compare -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_compare_curvatures(tmp_path: Path, activation: str) -> None:
    example = load_example("compare_curvatures")
    example.main(["--steps", "15", "--activation", activation, "--print-every", "5", "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "curvatures.csv")
    assert len(rows) == 15
    for r in rows:
        dcd = {c: float(r[f"dCd_{c}"]) for c in PROBE_CURVATURES}
        assert all(math.isfinite(v) for v in dcd.values()) and math.isfinite(float(r["dg"]))
        for c in ("ggn", "pch-clip", "pch-abs"):
            assert dcd[c] >= 0  # positive semi-definite by construction
        if activation == "relu":  # piecewise linear: all four diagonal blocks coincide
            for c in PROBE_CURVATURES:
                assert dcd[c] == pytest.approx(dcd["ggn"], rel=1e-4)
    if activation == "tanh":  # ... and a curved activation separates them
        assert any(float(r["dCd_hessian"]) != pytest.approx(float(r["dCd_ggn"]), rel=1e-3) for r in rows)
    assert_png(tmp_path / "curvatures.png")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(summary[c]["defined"] > 0 and math.isfinite(summary[c]["mean"]) for c in PROBE_CURVATURES)


def _tanh_mlp() -> nn.Sequential:
    return extend(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double())


def _tanh_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = _tanh_mlp()
    gen = torch.Generator().manual_seed(seed)
    batches = [
        (
            torch.randn(10, 4, generator=gen, dtype=torch.float64),
            torch.randn(10, 3, generator=gen, dtype=torch.float64),
        )
        for _ in range(3)
    ]
    return model, batches


@pytest.mark.parametrize("cls", [QuadraticLineSearchAdam, QuadraticLineSearchSGD])
def test_probe_equals_each_curvature_on_its_own(cls: type) -> None:
    """Four products in one backward, along the previewed d, equal four separate optimizers' dHd."""
    model, batches = _tanh_problem()
    loss_fn = extend(nn.MSELoss())
    extra = {"momentum": 0.9} if cls is QuadraticLineSearchSGD else {}
    driver = cls(model.parameters(), lr=1e-2, mode="observe", curvature="hessian", **extra)
    probe = CurvatureProbe()
    for x, y in batches:
        # references: a copy of the model and optimizer per curvature, each on its own backward
        reference = {}
        for name in PROBE_CURVATURES:
            m = _tanh_mlp()  # (an extended model that ran a forward cannot be deep-copied)
            m.load_state_dict(model.state_dict())
            o = cls(m.parameters(), lr=1e-2, mode="observe", curvature=name, **extra)
            o.load_state_dict(copy.deepcopy(driver.state_dict()))  # a live state_dict shares tensors
            with backpack(o.extension()):
                loss_fn(m(x), y).backward()
            o.step()
            reference[name] = (float(o.history[-1].dHd), float(o.history[-1].dg))

        driver.zero_grad()
        with backpack(driver.extension(), *probe.extensions()):
            loss_fn(model(x), y).backward()
        params, ds = preview_directions(driver)
        forms = probe.quadratic_forms(params, ds)
        probe.release(params)
        assert not any(hasattr(p, "quadstep_probe_ggn") for p in model.parameters())
        driver.step()
        assert float(driver.history[-1].dHd) == pytest.approx(reference["hessian"][0], rel=1e-12)
        for name in PROBE_CURVATURES:
            assert float(forms[name]) == pytest.approx(reference[name][0], rel=1e-12), name
            assert float(driver.history[-1].dg) == pytest.approx(reference[name][1], rel=1e-12)
        assert float(forms["hessian"]) != pytest.approx(float(forms["ggn"]), rel=1e-3)


def test_preview_leaves_the_optimizer_untouched() -> None:
    model, batches = _tanh_problem(1)
    loss_fn = extend(nn.MSELoss())
    opt = QuadraticLineSearchAdam(model.parameters(), mode="observe")
    for x, y in batches:
        opt.zero_grad()
        with backpack(opt.extension()):
            loss_fn(model(x), y).backward()
        before = copy.deepcopy(opt.state_dict())
        params, ds = preview_directions(opt)
        preview_directions(opt)  # twice: no state moved
        after = opt.state_dict()
        for key, state in before["state"].items():
            for k, v in state.items():
                assert torch.equal(after["state"][key][k], v)
        theta = [p.detach().clone() for p in params]
        opt.step()
        for p, t0, d in zip(params, theta, ds):  # observe mode: theta moved by lr * previewed d
            torch.testing.assert_close(p.detach(), t0 + 1e-3 * d, rtol=1e-12, atol=1e-15)


def test_probe_errors() -> None:
    with pytest.raises(ValueError, match="'ggn-exact'"):
        CurvatureProbe(["ggn-exact"])
    with pytest.raises(ValueError, match="once"):
        CurvatureProbe(["ggn", "ggn"])
    model, batches = _tanh_problem()
    x, y = batches[0]
    opt = QuadraticLineSearchAdam(model.parameters())
    with backpack(opt.extension()):  # the probe's extensions are missing
        extend(nn.MSELoss())(model(x), y).backward()
    params, ds = preview_directions(opt)
    with pytest.raises(RuntimeError, match=r"probe\.extensions\(\)"):
        CurvatureProbe(["ggn"]).quadratic_forms(params, ds)


# --- examples/observe_sgd_fashion_mnist.py -----------------------------------------------------


def _write_idx(path: Path, values: torch.Tensor) -> None:
    """An IDX file by hand: magic 0x00 0x00 0x08 (uint8) ndim, big-endian sizes, bytes; gzip-compressed."""
    header = bytes([0, 0, 0x08, values.dim()]) + struct.pack(f">{values.dim()}I", *values.shape)
    path.write_bytes(gzip.compress(header + values.to(torch.uint8).numpy().tobytes()))


def test_observe_sgd_fashion_mnist_reads_idx_files(tmp_path: Path) -> None:
    data = tmp_path / "idx"
    data.mkdir()
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 96), ("t10k", 32)):
        _write_idx(data / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=gen))
        _write_idx(data / f"{split}-labels-idx1-ubyte.gz", torch.randint(0, 10, (n,), generator=gen))
    example = load_example("observe_sgd_fashion_mnist")
    out = tmp_path / "out"
    summary = example.main([
        "--data-dir", str(data), "--steps", "8", "--batch-size", "16", "--momentum", "0.9",
        "--print-every", "4", "--out", str(out),
    ])
    assert summary["data"] == f"IDX files in {data}"
    assert summary["n_train"] == 96 and summary["steps"] == 8
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and math.isfinite(summary["test_loss"])
    assert_history_csv(out / "history.csv", 8)
    assert_png(out / "alpha_star.png")


def test_observe_sgd_fashion_mnist_falls_back_to_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example("observe_sgd_fashion_mnist")
    empty = tmp_path / "empty"
    empty.mkdir()
    summary = example.main(["--data-dir", str(empty), "--steps", "6", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert f"IDX files not found in {empty}" in printed
    assert "apt-get install dataset-fashion-mnist" in printed
    assert "Falling back to scikit-learn's digits" in printed
    assert summary["data"] == "scikit-learn digits"
    assert_history_csv(tmp_path / "out" / "history.csv", 6)
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        example.main(["--dataset", "fashion-mnist", "--data-dir", str(empty), "--out", str(tmp_path / "o2")])


# --- examples/drop_in.py ------------------------------------------------------------------------


@pytest.mark.slow
def test_drop_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("drop_in")
    rows = example.main(["--epochs", "2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "scale mode: the step-size policy's alpha went from 0.001" in printed
    assert "clipped at alpha_max=0.1 on" in printed
    for r in rows:  # the misclassified images' share of the test loss is part of it
        wrong = 1 - r["test_accuracy"]
        assert r["test_loss"] >= wrong * r["test_loss_misclassified"] - 1e-6 or wrong == 0
        assert r["largest_logit"] > 0
    table = read_csv(tmp_path / "epochs.csv")
    assert [(r["run"], int(r["epoch"])) for r in table] == [
        (run, epoch) for run in ("adam", "observe", "scale") for epoch in (1, 2)
    ]
    for r in table:
        assert math.isfinite(float(r["train_loss"])) and 0 <= float(r["test_accuracy"]) <= 1
    # the scheduler ran: cosine annealing over 2 epochs halves... to lr/2 at epoch 2
    assert [float(r["lr"]) for r in table[:2]] == pytest.approx([1e-3, 5e-4])
    # observe mode is Adam: identical losses, epoch by epoch
    adam, observe = rows[:2], rows[2:4]
    for a, o in zip(adam, observe):
        assert o["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)
        assert o["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    for run in ("observe", "scale"):
        assert len(read_csv(tmp_path / f"history_{run}.csv")) == 2 * 45  # 1437 samples / 32 per batch


# --- examples/mnist_cnn.py -----------------------------------------------------------------------


@pytest.mark.slow
def test_mnist_cnn_observe_mode_is_the_adam_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PyTorch's MNIST loop with NLLLoss after log_softmax under ggn-exact: observe mode trains exactly
    as torch.optim.Adam does (same dropout masks, same losses), scale mode steps with alpha*, and
    StepLR schedules lr."""
    example = load_example("mnist_cnn")
    tiny = ["--dataset", "digits", "--train-size", "96", "--test-size", "64", "--batch-size", "32",
            "--epochs", "2", "--log-interval", "1"]  # fmt: skip
    runs = {}
    for name, extra in [("adam", ["--optimizer", "adam"]), ("observe", ["--mode", "observe"]), ("scale", [])]:
        runs[name] = example.main([*tiny, *extra, "--out", str(tmp_path / name)])
    assert "scikit-learn digits, 96 training and 64 test images" in capsys.readouterr().out
    assert [r["lr"] for r in runs["observe"]] == pytest.approx([1e-3, 7e-4])
    for a, o in zip(runs["adam"], runs["observe"]):
        assert o["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert o["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)
    assert not (tmp_path / "adam" / "history.csv").exists()
    for name in ("observe", "scale"):
        assert_history_csv(tmp_path / name / "history.csv", 2 * 3)
        rows = read_csv(tmp_path / name / "epochs.csv")
        assert [int(r["epoch"]) for r in rows] == [1, 2]
        assert all(math.isfinite(float(r["test_loss"])) for r in rows)
    alphas = [float(r["alpha"]) for r in read_csv(tmp_path / "scale" / "history.csv")]
    assert alphas != pytest.approx([1e-3] * 6)  # scale mode: alpha*, not lr


@pytest.mark.slow
def test_mnist_cnn_reads_idx_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "idx"
    data.mkdir()
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 40), ("t10k", 20)):
        _write_idx(data / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=gen))
        _write_idx(data / f"{split}-labels-idx1-ubyte.gz", torch.randint(0, 10, (n,), generator=gen))
    monkeypatch.setenv("QUADSTEP_DATA_DIR", str(tmp_path / "nowhere"))  # --data-dir overrides it
    example = load_example("mnist_cnn")
    rows = example.main(["--dataset", "fashion-mnist", "--data-dir", str(data), "--train-size", "32",
                         "--batch-size", "16", "--out", str(tmp_path / "out")])  # fmt: skip
    assert len(rows) == 1 and 0.0 <= rows[0]["test_accuracy"] <= 1.0
    assert_history_csv(tmp_path / "out" / "history.csv", 2)


# --- examples/observe_adam_regression.ipynb -----------------------------------------------------


@pytest.mark.slow
def test_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    kernelspec = pytest.importorskip("ipykernel.kernelspec")

    # A kernel spec for *this* interpreter, first on JUPYTER_PATH: a user-wide "python3" spec
    # pointing at another Python (without quadstep) cannot be picked up instead.
    kernelspec.install(kernel_name="quadstep-test", prefix=str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    spec = json.loads((tmp_path / "jupyter/share/jupyter/kernels/quadstep-test/kernel.json").read_text())
    assert spec["argv"][0] == sys.executable

    nb = nbformat.read(EXAMPLES / "observe_adam_regression.ipynb", as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    out = tmp_path / "out"
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
        f"STEPS = 40\nPRINT_EVERY = 20\nDATA = 'noise'\nOUT = {str(out)!r}"
    ))
    client = nbclient.NotebookClient(
        nb, kernel_name="quadstep-test", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "Maximum alpha* value" in text and text.count("alpha_star: max") == 2
    assert_history_csv(out / "history.csv", 40)
    assert_png(out / "alpha_star.png")
