"""The test suite, grouped by layer (kernels, matching, deform, models, training, evaluation, demo, bench,
plots, cli) with shared helpers in ``tests.support``."""
