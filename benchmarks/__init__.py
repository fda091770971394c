"""Benchmarks of droppath_inject, each figure a ratio to its anchor measured in the same run.

Run ``python -m benchmarks --help``; ``python -m benchmarks --write`` regenerates
``benchmarks/RESULTS.md``.
"""
