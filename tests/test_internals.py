"""The walls: quadstep/_internals holds every private name of torch and BackPACK that quadstep uses."""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import quadstep
import quadstep._internals.backpack as backpack_wall
import quadstep._internals.torch as torch_wall
from quadstep.curvature import Curvature, make_curvature
from quadstep.curvature.backpack import BackpackCurvature
from quadstep.curvature.exact import ExactCurvature

PACKAGE = pathlib.Path(quadstep.__file__).parent
WALLS = PACKAGE / "_internals"
OUTSIDE = sorted(p for p in PACKAGE.rglob("*.py") if WALLS not in p.parents)


def _defined_names(trees: list[ast.AST]) -> set[str]:
    """Every name quadstep itself defines or assigns (functions, classes, variables, attributes)."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def test_the_walls_list_what_they_need_and_find_it_with_the_tested_versions() -> None:
    assert torch.__version__.startswith(quadstep._internals.TESTED_TORCH)
    assert "torch._fused_adam_" in torch_wall.NEEDS and "torch.Tensor._version" in torch_wall.NEEDS
    assert torch_wall.MISSING == ()
    assert backpack_wall.NEEDS and backpack_wall.MISSING == () and backpack_wall.MISSING_OPTIONAL == ()
    for cls, names in backpack_wall.NEEDS.items():
        assert all(hasattr(cls, name) for name in names), cls


def test_no_backpack_import_outside_the_walls() -> None:
    imports = []
    for path in OUTSIDE:
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            imports += [(path.name, m) for m in modules if m == "backpack" or m.startswith("backpack.")]
    assert imports == []
    hits = [
        p.name for p in OUTSIDE for word in ("saved_quantities", "input0", "CTX") if word in p.read_text()
    ]
    assert hits == []


def test_no_private_torch_name_outside_the_walls() -> None:
    """An attribute ``x._name`` (or ``getattr(x, "_name")``) outside the walls is quadstep's own."""
    trees = {path: ast.parse(path.read_text()) for path in OUTSIDE}
    own = _defined_names(list(trees.values())) | {p.stem for p in PACKAGE.rglob("*")}
    foreign = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                name = node.value
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                module = getattr(node, "module", None) or ""
                parts = [p for a in node.names for p in a.name.split(".")] + module.split(".")
                name = next((p for p in parts if p.startswith("_") and p not in own), None)
            if name and name.startswith("_") and not name.startswith("__") and name not in own:
                foreign.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {name}")
    assert foreign == []


@pytest.fixture
def without_fused_adam(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torch without ``_fused_adam_``: the wall, then the direction module, re-imported."""
    from quadstep import direction

    monkeypatch.delattr(torch, "_fused_adam_")
    importlib.reload(torch_wall)
    importlib.reload(direction)
    yield
    monkeypatch.undo()
    importlib.reload(torch_wall)
    importlib.reload(direction)


def test_without_the_fused_kernel_adam_takes_the_tensor_op_path(without_fused_adam: None) -> None:
    from quadstep import direction

    assert "torch._fused_adam_" in torch_wall.MISSING and torch_wall.fused_adam_devices() == frozenset()
    assert direction.FUSED_DEVICES == frozenset()
    torch.manual_seed(0)
    params = [torch.randn(3, 4), torch.randn(4)]
    grads = [torch.randn_like(p) for p in params]
    group = {"betas": (0.9, 0.999), "eps": 1e-8, "fused": None}
    d = direction.adam(group, params, grads, [{}, {}], torch.tensor(True))
    reference = [-g / (g.abs() + 1e-8) for g in grads]  # m̂ = g and v̂ = g² at t = 1
    torch.testing.assert_close(d, reference)


def test_a_missing_required_name_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_wall, "MISSING", ("torch.Tensor._version",))
    model = nn.Sequential(nn.Linear(2, 1))
    with pytest.raises(
        RuntimeError, match=r"torch.Tensor._version.*tested with torch 2.13 and BackPACK 1.7.1"
    ):
        ExactCurvature("hessian-exact", model, nn.MSELoss())
    with pytest.raises(RuntimeError, match="tested with torch"):
        BackpackCurvature("hessian", model=model)


def test_without_torch_hook_tables_ggn_exact_takes_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wall that cannot tell whether foreign hooks are registered sends the walk's work to the dual pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    forms = {}
    for missing in ((), ("torch.nn.Module._forward_hooks",)):
        monkeypatch.setattr(torch_wall, "MISSING", missing)
        curvature = ExactCurvature("ggn-exact", model, nn.MSELoss())
        curvature.loss_fn(model(x), y).backward()
        params = list(model.parameters())
        ds = [torch.ones_like(p) for p in params]
        walks: list[int] = []

        def counted(*args, walks=walks, walk=curvature._sequential.walk):
            walks.append(1)
            return walk(*args)

        monkeypatch.setattr(curvature._sequential, "walk", counted)
        forms[missing] = (curvature.quadratic_forms(params, ds)[0], len(walks))
        curvature.release(params)
        model.zero_grad()
    (walked, n_walked), (general, n_general) = forms.values()
    assert n_walked == 1 and n_general == 0
    torch.testing.assert_close(walked, general)


@pytest.mark.parametrize("name", [*BackpackCurvature.NAMES, *ExactCurvature.NAMES])
def test_both_families_implement_the_curvature_protocol_with_its_signatures(name: str) -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    curvature = make_curvature(name, model, nn.MSELoss())
    assert isinstance(curvature, Curvature)
    assert isinstance(curvature.name, str) and isinstance(curvature.block_diagonal, bool)
    for method in (
        "extension",
        "context",
        "prepare",
        "check_ready",
        "quadratic_forms",
        "forms_along",
        "block_forms",
        "release",
    ):
        protocol = list(inspect.signature(getattr(Curvature, method)).parameters)[1:]
        assert list(inspect.signature(getattr(curvature, method)).parameters) == protocol, method
