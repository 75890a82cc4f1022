"""Shared test set-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """One torch thread: the models are tiny, and on a busy 2-core machine tiny ops otherwise wait
    on the thread pool (BackPACK's softmax took 8 ms instead of 0.1 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["fused", "tensor-ops"])
def adam_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both paths of Adam's direction: torch's fused kernel and the tensor ops."""
    import quadstep.direction

    if request.param == "tensor-ops":
        monkeypatch.setattr(quadstep.direction, "FUSED_DEVICES", frozenset())
    elif "cpu" not in quadstep.direction.FUSED_DEVICES:
        pytest.skip("this torch has no fused Adam kernel on CPU")
    return request.param
