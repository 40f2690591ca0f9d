"""Several Python threads calling the fused AKL's compiled row loops at once, each with its own thread count
(two trainers in one process, or a data-loader thread scoring beside training): every call finishes with
the answer of a one-thread call."""

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from dpkd.backends import _akl_numba
from dpkd.spec._common import softmax


@pytest.mark.skipif(not _akl_numba.available(), reason="needs numba (the `numba` extra)")
def test_callers_with_different_thread_counts_at_once_get_the_one_thread_answer():
    rng = np.random.default_rng(0)
    p, q = softmax(rng.normal(size=(12, 64)) * 3), softmax(rng.normal(size=(12, 64)))
    want = _akl_numba.head_weights(p, q, 0.5, 1)

    def caller(threads):
        for _ in range(100):  # the counts differ between callers: each needs its own pool at once
            np.testing.assert_array_equal(_akl_numba.head_weights(p, q, 0.5, threads), want)

    # switch between Python threads every microsecond, not every 5 ms, so that a race needing a switch
    # between two statements happens within these calls
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(3) as callers:
            for done in [callers.submit(caller, k) for k in (2, 3, 4)]:
                done.result()
    finally:
        sys.setswitchinterval(interval)
