"""run_local, the job runner of the distributed tests: every rank's result in rank order, and a failing,
dying or hanging rank reported within bounded time, so that it cannot hang the suite.

A test whose docstring starts "Once failed" failed before its fix, and says what was wrong.
"""

from __future__ import annotations

import time

import pytest

import distributed_cases as cases
from multihead.distributed.local import RankFailed, run_local

PROMPT_TIMEOUT = 60.0  # far above the seconds two spawned processes take to start on a loaded 2-core machine (~10)


@pytest.mark.parametrize("N", [1, 2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_run_local_returns_every_ranks_result_in_rank_order(distributed_job, N):
    assert [r["rank"] for r in distributed_job(N)] == list(range(N))


def test_a_rank_that_raises_fails_the_job_within_bounded_time():
    start = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 fails on purpose") as failure:
        run_local(cases.raise_on_rank, 2, (1,), timeout=PROMPT_TIMEOUT)
    assert time.monotonic() - start < PROMPT_TIMEOUT
    text = str(failure.value)
    assert "rank 0 failed" in text or "ranks [0] did not finish" in text  # the other rank: raised, or killed


def test_run_local_reports_an_unpicklable_result_and_a_dead_rank_promptly():
    """Once failed, twice: a result that cannot be pickled was dropped by the queue's feeder thread, and a rank
    process that died without answering was noticed only at the timeout: the job waited the whole timeout and
    reported ranks that 'did not finish'. Rank 0 returns what cannot be pickled; rank 1 exits with code 3."""
    start = time.monotonic()
    with pytest.raises(RankFailed) as failure:
        run_local(cases.unpicklable_or_exit, 2, timeout=PROMPT_TIMEOUT)
    text = str(failure.value)
    assert time.monotonic() - start < PROMPT_TIMEOUT / 2, text  # reported, not waited out
    assert "rank 0 failed" in text and "pickle" in text.split("rank 1 failed")[0], text
    assert "rank 1 failed" in text and "code 3" in text.split("rank 1 failed")[-1], text
    assert "did not finish" not in text, text


def test_run_local_kills_hung_ranks_at_the_timeout():
    """Once failed: hung ranks were joined 5 s each before being killed, so a 4 s timeout took about 14 s with
    two ranks."""
    start = time.monotonic()
    with pytest.raises(RankFailed, match="did not finish"):
        run_local(cases.sleep_forever, 2, timeout=4)
    assert time.monotonic() - start < 4 + 3


def test_run_local_names_a_bad_timeout():
    """Once failed: run_local did not check timeout: '5' started the processes, then failed with a bare
    'unsupported operand' TypeError."""
    with pytest.raises((TypeError, ValueError), match="timeout"):
        run_local(cases.rank, 2, timeout="5")
