"""Benchmarks for quadstep: does alpha* along Adam's direction train as well as a tuned lr, at what cost?

Layout (after AlgoPerf/DeepOBS): :mod:`benchmarks.workloads` (problem + data + model + loss),
:mod:`benchmarks.submissions` (optimizers and their settings), :mod:`benchmarks.runner` (joins them
and writes the files), :mod:`benchmarks.report` (tables and plots from those files).
Run ``python -m benchmarks --help``.
"""
