"""CardSession's runs: slices of max_rows, each cut into chunks run side by side on one-thread sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from carddeck.deck.runtime import (
    BLAS_THREAD_VARIABLES,
    CHUNK_ROWS,
    CardSession,
    choose_providers,
    chunks,
    row_pool,
    run_claimed,
    softmax,
)
from tests.deck.conftest import card


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_is_the_textbook_formula_in_float32_and_leaves_the_logits_alone(dtype):
    """softmax works in place on its own array: the caller's logits (a card's output, maybe cached) stay as
    they were, and the answer is exactly exp(z - max) / sum, float32 (large logits: no overflow)."""
    logits = (np.random.default_rng(0).standard_normal((5, 10)) * 40).astype(dtype)
    logits[0, 3] = 500.0
    kept = logits.copy()
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
    out = softmax(logits)
    assert out.dtype == np.float32 and np.array_equal(out, expected)
    assert np.array_equal(logits, kept)


@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 64, 100])
def test_chunks_cover_the_rows_in_order_and_are_never_too_small(n):
    spans = chunks(n)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a < b and b == c for (a, b), (c, _) in zip(spans, [*spans[1:], (n, n)]))
    assert len(spans) == 1 or min(b - a for a, b in spans) >= CHUNK_ROWS
    assert len(spans) == max(1, n // CHUNK_ROWS)  # as many chunks as the rows allow


def session(**kw) -> tuple[CardSession, list[tuple[int, str]]]:
    """A one-thread session whose ORT runs are recorded as (rows, thread name)."""
    s = CardSession(
        card("g1", "gaussian", seed=3), key="g1/1", digest="", providers=choose_providers(), intra_op_threads=1, **kw
    )
    runs: list[tuple[int, str]] = []
    real = s.session.run

    def recording(names, feeds):
        runs.append((len(feeds["images"]), threading.current_thread().name))
        return real(names, feeds)

    s.session.run = recording  # type: ignore[method-assign]
    return s, runs


def images(n: int) -> np.ndarray:
    return np.random.default_rng(n).random((n, 3, 32, 32), dtype=np.float32)


def test_a_large_run_goes_in_chunks_and_answers_as_one_run():
    whole, whole_runs = session()
    split, split_runs = session(row_chunks=2)
    x = images(64)
    np.testing.assert_allclose(split.logits(x), whole.logits(x), rtol=1e-5, atol=1e-6)  # each row its own logits
    assert whole_runs == [(64, threading.current_thread().name)]
    assert [rows for rows, _ in split_runs] == [CHUNK_ROWS] * (64 // CHUNK_ROWS)
    split_runs.clear()
    split.logits(images(CHUNK_ROWS * 2 - 1))  # too few rows for two chunks: one run
    assert [rows for rows, _ in split_runs] == [CHUNK_ROWS * 2 - 1]


def test_run_claimed_answers_in_order_and_the_caller_runs_jobs_too():
    threads: list[str] = []
    both = threading.Barrier(2, timeout=10)  # the first two jobs meet: each is held until a second thread has one

    def square(i: int) -> int:
        threads.append(threading.current_thread().name)
        if i < 2:
            both.wait()
        return i * i

    assert run_claimed(list(range(12)), square, row_pool(), 2) == [i * i for i in range(12)]
    # no hand-off per job: the caller works instead of waiting (without it, the barrier times out)
    assert threading.current_thread().name in threads
    assert run_claimed([], square, row_pool(), 2) == []


def test_chunks_stay_within_a_slice_of_max_rows():
    s, runs = session(row_chunks=2, max_rows=16)
    x = images(40)
    np.testing.assert_allclose(s.logits(x), session()[0].logits(x), rtol=1e-5, atol=1e-6)
    assert [rows for rows, _ in runs] == [8, 8, 8, 8, 8]  # slices 16, 16 and 8, in chunks of 8


def test_a_busy_row_pool_does_not_hold_a_run_up():
    """Every row-pool worker busy (say, other cards' chunks): the caller takes its chunks back and runs them."""
    s, runs = session(row_chunks=2)
    release = threading.Event()
    workers = row_pool()._max_workers
    blockers = [row_pool().submit(release.wait, 30) for _ in range(workers)]
    try:
        done = threading.Event()
        out: list[np.ndarray] = []
        caller = threading.Thread(target=lambda: (out.append(s.logits(images(64))), done.set()), name="caller")
        caller.start()
        assert done.wait(20), "the run waited for a row-pool worker"
        assert {name for _, name in runs} == {"caller"} and len(runs) == 8 and out[0].shape == (64, 10)
    finally:
        release.set()
        for blocker in blockers:
            blocker.result()


# In a fresh process (BLAS limits are process-wide): BLAS raised to 2 threads first, so that a one-core machine
# would see the limit too; then one_blas_thread; then every BLAS library's thread count.
BLAS_PROBE = """
import json, numpy, threadpoolctl
threadpoolctl.threadpool_limits(2, user_api="blas")
from carddeck.deck.runtime import one_blas_thread
said = one_blas_thread()
print(json.dumps([said, [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]]))
"""


def blas_probe(**env: str) -> tuple[str, list[int]]:
    clean = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARIABLES}
    out = subprocess.run([sys.executable, "-c", BLAS_PROBE], env={**clean, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    said, threads = json.loads(out.stdout.strip().splitlines()[-1])
    return said, threads


def test_a_serving_process_runs_blas_on_one_thread_unless_the_environment_says_otherwise():
    said, threads = blas_probe()
    assert threads and set(threads) == {1}, threads  # numpy's BLAS at least
    assert "1 thread" in said
    said, threads = blas_probe(OPENBLAS_NUM_THREADS="2")  # the user's own choice stays
    assert set(threads) == {2} and "OPENBLAS_NUM_THREADS=2" in said
