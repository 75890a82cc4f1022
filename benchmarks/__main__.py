"""Command line: ``python -m benchmarks [--quick | --full] [options]``, or ``... SUBCOMMAND``.

Subcommands: ``report`` (summary.md and plots from a run's files), ``overhead`` (time and memory
of each curvature option against Adam), ``memory``, ``probe`` (α* along the peers' steps, by
:class:`quadstep.StepProbe`); each takes its own ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

#: Subcommand -> module whose ``main(argv)`` handles it (imported only when used).
SUBCOMMANDS = {
    "report": "benchmarks.report",
    "overhead": "benchmarks.overhead",
    "memory": "benchmarks.memory",
    "probe": "benchmarks.probe",
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from .workloads import all_workloads

    names = list(all_workloads())

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Fixed Adam learning rates against quadstep's alpha* and the self-tuning peers. "
        f"Subcommands: {', '.join(SUBCOMMANDS)} (e.g. `python -m benchmarks overhead --help`).",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="size",
        help="the quick embedded workloads only (digits MLP, noisy quadratic), a few minutes on 2 cores "
        "(the default)",
    )
    size.add_argument(
        "--full",
        action="store_const",
        const="full",
        dest="size",
        help="every workload whose data is available, full data and step counts",
    )
    size.add_argument(
        "--tiny",
        action="store_const",
        const="tiny",
        dest="size",
        help="a few steps on tiny data: a smoke test of the whole pipeline",
    )
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: results/)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="folder with MNIST/Fashion-MNIST IDX files (default: where `apt-get install "
        "dataset-fashion-mnist` puts them)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=names,
        metavar="NAME",
        help=f"run only these ({', '.join(names)}); default: the quick ones for --quick, all for --full",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        metavar="NAME",
        help="run only these optimizers (adam, sgd, quadstep_adam, prodigy, dadapt_adam, schedulefree_adamw)",
    )
    parser.add_argument(
        "--curvatures",
        nargs="+",
        metavar="NAME",
        help="run quadstep only with these curvatures (default: every one in quadstep.CURVATURES)",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        metavar="NAME[@K]",
        help="quadstep's step-size policies in scale mode, each optionally with its curvature-query "
        "interval, e.g. `lagged lagged@10 greedy` (default: greedy lagged lagged@10)",
    )
    parser.add_argument(
        "--steps", type=int, help="steps per run for every workload (default: per workload and size)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default: 1: the models are small, and one thread gives steadier "
        "timings on a shared machine)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(size="quick")
    args = parser.parse_args(argv)
    import quadstep

    from .submissions import ABLATIONS

    unknown = set(args.curvatures or ()) - set(quadstep.CURVATURES)
    if unknown:
        parser.error(
            f"unknown curvature(s) {', '.join(sorted(unknown))}; choose from {', '.join(quadstep.CURVATURES)}"
        )
    policies = []
    names = [*quadstep.stepsize.POLICIES, *ABLATIONS]
    for spec in args.policies or ():
        name, _, every = spec.partition("@")
        if name not in names or (every and not every.isdigit()) or every == "0":
            parser.error(f"--policies: {spec!r} is not NAME[@K] with NAME in {', '.join(names)}")
        policies.append((name, int(every or 1)))
    args.policies = policies or None
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a folder")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]) or 0

    args = parse_args(argv)
    import torch

    from . import report, runner
    from .data import DATA_DIR_ENV
    from .workloads import all_workloads

    if args.data_dir is not None:
        os.environ[DATA_DIR_ENV] = str(args.data_dir)
    torch.set_num_threads(args.threads)
    workloads = all_workloads()
    names = args.workloads or [n for n, w in workloads.items() if w.quick or args.size != "quick"]
    start = time.perf_counter()
    rows = runner.run(
        [workloads[n] for n in names],
        args.size,
        args.seeds,
        args.out,
        steps=args.steps,
        optimizers=args.optimizers,
        curvatures=args.curvatures,
        progress=not args.no_progress,
        policies=args.policies,
    )
    if not rows:
        logging.error("nothing ran (no workload had its data); see the messages above")
        return 1
    written = report.write_report(args.out)
    logging.info(
        "%d runs in %.0f s; wrote %s and %d plots",
        len(rows),
        time.perf_counter() - start,
        args.out / "results.csv",
        len(written) - 1,
    )
    logging.info("summary: %s", args.out / "summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
