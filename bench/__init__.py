"""Benchmarks: argparse CLIs (``python -m bench.<name> [--quick]``) appending rows to ``bench/results/``."""
