"""Benchmarks of lookahead_optax (run with ``python -m benchmarks.run``).

Not part of the installed package; see docs/benchmarks.md for the results.
"""
