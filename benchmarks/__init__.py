"""Benchmark scripts, run as modules from the repository root (``python -m benchmarks.mnist_step``).

``harness`` holds what they share: the clock (synchronised on CUDA), medians, the machine and
library versions, and the writer of the results files (Markdown + JSON).
"""
