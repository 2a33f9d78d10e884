"""pytest-benchmark benchmarks of the matchers on CPU (small shapes): ``pytest bench/ --benchmark-only``.

Not part of ``make test`` (pyproject's testpaths is tests/). The CSV record comes from ``bench.suite``."""

import pytest

from bench.patchmatch import features, matchers

IMPLS = [name for name in matchers("cpu") if not name.endswith("/triton")]


@pytest.fixture(scope="module")
def maps():
    return features("random", 48, 16, 1, 1, "cpu")


@pytest.mark.parametrize("name", IMPLS)
def test_matcher(benchmark, maps, name):
    q, refs = maps
    run = matchers("cpu")[name].run
    ms = benchmark(run, q, refs, (1, 1, 2, 6))
    assert ms[0].pos.shape == (1, 48, 48, 2)
