"""Benchmarks for quadstep: does alpha* along Adam's direction train as well as a tuned lr, at what cost?

Layout (after AlgoPerf/DeepOBS): :mod:`benchmarks.workloads` (problem + data + model + loss),
:mod:`benchmarks.submissions` (optimizers and their settings; each builds its optimizer and takes
its own training step), :mod:`benchmarks.training` (the one loop that steps a submission over
batches), :mod:`benchmarks.runner` (joins them and writes the files), :mod:`benchmarks.report`
(tables and plots from those files).
Run ``python -m benchmarks --help``.
"""
