r"""What a quadstep step costs next to a ``torch.optim.Adam`` step: ``python -m benchmarks overhead``.

For every problem (ReLU MLPs 784-256-…-256-10 with ``depth`` linear layers, and the
Fashion-MNIST CNN of :mod:`benchmarks.workloads.fmnist_cnn`; batch 128, random data,
cross-entropy) and every curvature option in :data:`quadstep.CURVATURES`, one
*step* is the submission's own (:class:`~benchmarks.submissions.Trainer`): ``zero_grad`` +
forward + backward + ``optimizer.step()``:

- Adam: ``torch.optim.Adam`` on a plain model (merely ``extend``-ing a model slows its backward),
  with its defaults: the reference of every ratio. ``adam-fused``: the same with ``fused=True``,
  the kernel quadstep's Adam direction runs where it exists, for comparison.
- BackPACK curvatures: :class:`~quadstep.QuadraticLineSearchAdam` on an ``extend``-ed copy,
  given ``model=`` (so that the backward frees the activations BackPACK keeps; not with
  ``--without-model``), the backward inside ``with backpack(opt.extension()):``.
- Any other curvature (e.g. exact ones that need no BackPACK): the optimizer is built with
  ``model=model, loss_fn=loss_fn`` and stepped after a plain backward; an option whose
  constructor refuses these arguments is skipped with a message.

quadstep runs in ``mode="scale"`` with each step-size policy of ``--policies`` (``NAME@K``: the
curvature queried every K steps); alpha stays within the policy's clip, [0, 0.1] by default.

Time: every contender keeps its own model and optimizer; after ``--warmup`` steps each,
``--rounds`` rounds run ``--steps`` steps of every contender in turn (the order rotates
from round to round). A round's ratio is a contender's mean step time over Adam's in the same
round, so load from other processes hits both sides alike; the table gives the median
ratio over rounds and its 25–75 % spread. ``--clock cpu`` counts the process's CPU time
instead of wall time: on a machine shared with other jobs, time spent descheduled then does
not count (use it with ``--threads 1``; with more threads it sums their CPU time).

Peak memory: the most bytes of CPU tensors alive at once, counted from the allocator's own
reports to :mod:`torch.profiler` (``profile_memory=True``): every allocation and free made
while a fresh copy of the model and its optimizer are built and run for ``--memory-steps`` steps
(at least ``K + 2`` for ``NAME@K``: through the step after a full cycle, which holds a lagged
policy's first measurement along d_{t-1}), summed in time order. This counts parameters, gradients, optimizer state, activations, everything
BackPACK keeps, and temporaries — everything but the input batch, which both sides share.
Process RSS would mostly show the allocator's and the interpreter's reserves instead.

Writes ``overhead.csv`` (one row per problem × contender), ``overhead.md`` and
``overhead_metadata.json`` (commit, versions, CPU, threads, options) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import quadstep

from .runner import metadata
from .submissions import Submission, Trainer, quadstep_default, runs_with
from .training import train
from .workloads.fmnist_cnn import make_model as make_cnn

BATCH_SIZE = 128
WIDTH = 256
NUM_CLASSES = 10
LR = 1e-3
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class Problem:
    """A model to train on random data of shape ``(batch, *input_shape)``."""

    name: str
    make_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


@dataclass(frozen=True)
class Contender:
    """An optimizer to time, as the submission that builds it and takes its steps."""

    name: str
    submission: Submission
    policy: str = ""  #: quadstep's step-size policy and curvature-query interval, e.g. ``lagged@10``

    @property
    def curvature(self) -> str:
        return self.submission.curvature

    def trainer(self, template: nn.Module) -> Trainer:
        """A fresh copy of ``template`` with this contender's optimizer, ready to step."""
        return self.submission.init(copy.deepcopy(template), nn.CrossEntropyLoss())


def make_mlp(depth: int) -> nn.Sequential:
    """ReLU MLP 784-256-…-256-10 with ``depth`` linear layers."""
    widths = [28 * 28] + [WIDTH] * (depth - 1) + [NUM_CLASSES]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def problems(depths: Sequence[int], cnn: bool) -> list[Problem]:
    out = [Problem(f"mlp-depth{depth}", lambda depth=depth: make_mlp(depth), (28 * 28,)) for depth in depths]
    if cnn:
        out.append(Problem("cnn", make_cnn, (1, 28, 28)))
    return out


def _policy(spec: str) -> tuple[str, int]:
    """``NAME[@K]`` as the optimizer's ``(step_size, every)``."""
    name, _, every = spec.partition("@")
    return name, int(every or 1)


def contenders(
    curvatures: Sequence[str], policies: Sequence[str] = ("greedy",), given_model: bool = True
) -> list[Contender]:
    """Adam (the reference), Adam with its fused kernel, then one quadstep contender (scale mode) per
    curvature and step-size policy ``NAME[@K]``; the BackPACK ones given ``model=`` when ``given_model``."""
    out = [
        Contender("adam", Submission("adam", LR)),
        Contender("adam-fused", Submission("adam", LR, options=(("fused", True),))),
    ]
    defaults = (("history_size", quadstep_default("history_size")),)  # what a user's run keeps
    for policy in policies:
        for curvature in curvatures:
            step_size, every = _policy(policy)
            if not runs_with(step_size, curvature):
                continue
            sub = Submission(
                "quadstep_adam", LR, curvature, "scale", step_size, every,
                options=defaults, free_activations=given_model,
            )  # fmt: skip
            out.append(Contender("quadstep", sub, policy))
    return out


def _steps(trainer: Trainer, x: Tensor, y: Tensor, steps: int) -> None:
    """``steps`` training steps of ``trainer`` on the batch ``(x, y)``."""
    for _ in train(trainer, itertools.repeat((x, y)), steps):
        pass


#: What torch's profiler (kineto) writes to the stderr file descriptor at every start and stop.
_PROFILER_LINE = re.compile(r"^(USDT|STAGE):\S+ \S+ \d+:\d+ \w*ActivityProfiler\w*\.cpp:\d+\]")


@contextlib.contextmanager
def _without_profiler_lines() -> Iterator[None]:
    """Drop the profiler's start/stop lines; whatever else reaches stderr meanwhile passes on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _PROFILER_LINE.match(line)))


def peak_bytes(contender: Contender, template: nn.Module, x: Tensor, y: Tensor, steps: int) -> int:
    """Most bytes of CPU tensors alive at once while a fresh copy is built and run ``steps`` steps."""
    from torch._C._profiler import _EventType

    gc.collect()
    with _without_profiler_lines(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = contender.trainer(template)
        _steps(trainer, x, y, steps)
        del trainer
    events = list(prof.profiler.kineto_results.experimental_event_tree())
    allocations = []
    while events:
        event = events.pop()
        events.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    allocations.sort(key=lambda a: a[0])
    live = peak = 0
    for _, size in allocations:
        live += size
        peak = max(peak, live)
    return peak


@dataclass
class Result:
    problem: str
    contender: Contender
    seconds: list[float]
    ratios: list[float]
    peak: int
    peak_ratio: float


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile, ``q`` in [0, 1]."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_problem(
    problem: Problem,
    entries: list[Contender],
    *,
    clock: Callable[[], float],
    warmup: int,
    rounds: int,
    steps: int,
    memory_steps: int,
    seed: int,
) -> list[Result]:
    torch.manual_seed(seed)
    template = problem.make_model()
    x = torch.randn(BATCH_SIZE, *problem.input_shape)
    y = torch.randint(0, NUM_CLASSES, (BATCH_SIZE,))

    runnable: list[tuple[Contender, Trainer]] = []
    for entry in entries:
        try:
            trainer = entry.trainer(template)
        except (TypeError, RuntimeError) as err:  # takes no model/loss_fn; no fused kernel here
            print(f"  skipped {entry.name} {entry.curvature}: {err}")
            continue
        runnable.append((entry, trainer))
    for _, trainer in runnable:
        _steps(trainer, x, y, 1 + warmup)

    seconds: list[list[float]] = [[] for _ in runnable]
    for r in range(rounds):
        order = [(i + r) % len(runnable) for i in range(len(runnable))]
        for i in order:
            start = clock()
            _steps(runnable[i][1], x, y, steps)
            seconds[i].append((clock() - start) / steps)

    peaks = [
        peak_bytes(
            entry, template, x, y, max(memory_steps, _policy(entry.policy)[1] + 2 if entry.policy else 0)
        )
        for entry, _ in runnable
    ]
    return [
        Result(
            problem=problem.name,
            contender=entry,
            seconds=seconds[i],
            ratios=[s / a for s, a in zip(seconds[i], seconds[0])],
            peak=peaks[i],
            peak_ratio=peaks[i] / peaks[0],
        )
        for i, (entry, _) in enumerate(runnable)
    ]


COLUMNS = (
    "problem", "optimizer", "curvature", "policy", "ms_median", "ms_p25", "ms_p75",
    "time_ratio_median", "time_ratio_p25", "time_ratio_p75", "time_ratio_min", "time_ratio_max",
    "peak_mib", "peak_ratio",
)  # fmt: skip


def row(result: Result) -> dict[str, str]:
    ms = [1e3 * s for s in result.seconds]
    return {
        "problem": result.problem,
        "optimizer": result.contender.name,
        "curvature": result.contender.curvature,
        "policy": result.contender.policy,
        "ms_median": f"{statistics.median(ms):.3f}",
        "ms_p25": f"{quantile(ms, 0.25):.3f}",
        "ms_p75": f"{quantile(ms, 0.75):.3f}",
        "time_ratio_median": f"{statistics.median(result.ratios):.3f}",
        "time_ratio_p25": f"{quantile(result.ratios, 0.25):.3f}",
        "time_ratio_p75": f"{quantile(result.ratios, 0.75):.3f}",
        "time_ratio_min": f"{min(result.ratios):.3f}",
        "time_ratio_max": f"{max(result.ratios):.3f}",
        "peak_mib": f"{result.peak / 2**20:.2f}",
        "peak_ratio": f"{result.peak_ratio:.3f}",
    }


def markdown(rows: list[dict[str, str]], header: str) -> str:
    lines = [
        header,
        "",
        "| problem | optimizer | curvature | policy | ms/step (median) | time ratio vs Adam (median [p25–p75]) "
        "| peak MiB | peak ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['optimizer']} | {r['curvature'] or '—'} | {r['policy'] or '—'} | "
            f"{r['ms_median']} | "
            f"{r['time_ratio_median']}× [{r['time_ratio_p25']}–{r['time_ratio_p75']}] | "
            f"{r['peak_mib']} | {r['peak_ratio']}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[3, 5, 8], help="MLP depths (linear layers)")
    parser.add_argument("--no-cnn", action="store_true", help="skip the CNN")
    parser.add_argument(
        "--curvatures", nargs="+", default=list(quadstep.CURVATURES), choices=quadstep.CURVATURES
    )
    parser.add_argument(
        "--policies", nargs="+", default=["greedy", "lagged", "lagged@10"], metavar="NAME[@K]",
        help="step-size policies (with curvature-query interval K) of the quadstep contenders "
        "(default: greedy lagged lagged@10)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per contender (default: 5)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (default: 15)")
    parser.add_argument("--steps", type=int, default=5, help="steps per contender per round (default: 5)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps in the memory run (default: 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="wall or process CPU time (default: wall)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's); 1 on a busy machine"
    )
    parser.add_argument(
        "--without-model", action="store_true",
        help="BackPACK contenders without model= (BackPACK then keeps every activation through backward)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: results/)")
    args = parser.parse_args(argv)
    if min(args.depths) < 2:
        parser.error("--depths must be at least 2")
    if min(args.rounds, args.steps, args.memory_steps) < 1:
        parser.error("--rounds, --steps and --memory-steps must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    header = (
        f"Overhead of one training step (zero_grad + forward + backward + step) against torch.optim.Adam; "
        f"batch {BATCH_SIZE}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}, {args.clock} clock, {args.rounds} rounds × {args.steps} steps, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC."
    )
    print(header)
    rows: list[dict[str, str]] = []
    for problem in problems(args.depths, not args.no_cnn):
        print(f"{problem.name} ...", flush=True)
        results = run_problem(
            problem, contenders(args.curvatures, args.policies, not args.without_model), clock=CLOCKS[args.clock],
            warmup=args.warmup, rounds=args.rounds, steps=args.steps, memory_steps=args.memory_steps,
            seed=args.seed,
        )  # fmt: skip
        rows += [row(r) for r in results]
    table = markdown(rows, header)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "overhead.csv", "w", encoding="utf-8") as f:
        f.write(",".join(COLUMNS) + "\n")
        f.writelines(",".join(r[c] for c in COLUMNS) + "\n" for r in rows)
    (args.out / "overhead.md").write_text(table, encoding="utf-8")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    meta = metadata(benchmark="overhead", batch_size=BATCH_SIZE, **config)
    (args.out / "overhead_metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote overhead.csv, overhead.md and overhead_metadata.json to {args.out}")


if __name__ == "__main__":
    main()
