"""Figures reproducing the paper's studies; each module is a command (``python -m plots.<name>``) that
writes a PNG and the CSV it was drawn from, side by side, to ``plots/figures`` (``--quick``: a small run
for CI, written to ``out/plots``)."""
