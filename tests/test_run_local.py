"""run_local, the job runner of the distributed tests: every rank's result in rank order, and a failing,
dying or hanging rank reported within bounded time, so that it cannot hang the suite.

A test whose docstring starts "Once failed" failed before its fix, and says what was wrong.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
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


# -- functions the children cannot import by name: a notebook's, `python -`'s, lambdas ---------------------


NOTEBOOK = [  # a notebook's cells, as a user writes them: the function, and a helper it calls, in the notebook
    "import torch\nimport torch.distributed as dist\nfrom multihead.distributed.local import run_local\nSCALE = 10",
    "def scaled(x):\n    return x * SCALE\n\n\ndef work(x):\n    total = torch.tensor([dist.get_rank() + 1.0])\n"
    "    dist.all_reduce(total)  # 1 + 2 on two ranks\n    return scaled(x) + total.item()",
    "print(run_local(work, 2, (1,), timeout=60))",
]


def test_run_local_runs_a_function_defined_in_a_notebook(tmp_path):
    """Once failed: the children could not unpickle the notebook's __main__.work: 'RankFailed: rank 0 failed: the
    process exited with code 1 without answering'. The notebook runs in a real kernel (nbclient)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell) for cell in NOTEBOOK])
    nbclient.NotebookClient(notebook, timeout=PROMPT_TIMEOUT * 2, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    assert printed.strip() == "[13.0, 13.0]", notebook.cells[-1].outputs


STDIN_SCRIPT = """
import threading
import types
import torch.distributed as dist
from multihead.distributed.local import run_local

lock = threading.Lock()                             # cannot be pickled: named below only as an attribute

def factorial(n):
    return 1 if n <= 1 else n * factorial(n - 1)    # a function that reaches itself through the globals

def work(x, *, offset=100):
    add = lambda y: y + offset                      # a closure over a keyword default
    return add(factorial(x)) + dist.get_world_size() + types.SimpleNamespace(lock=0).lock

class Point:
    pass

def makes_a_point():
    return Point()

print(run_local(work, 1, (4,), timeout=60))
try:
    run_local(makes_a_point, 1)
except TypeError as exc:
    print(exc)
"""


def test_run_local_runs_a_function_from_python_stdin_and_refuses_a_class_from_there_up_front(tmp_path):
    """Once failed: under `python -` each child died before running anything (spawn re-ran __main__'s file,
    '<stdin>', which does not exist), reported as 'exited with code 1 without answering'. A class defined
    there cannot be sent: refused in the parent, saying where to define it."""
    done = subprocess.run([sys.executable, "-"], input=STDIN_SCRIPT, capture_output=True, text=True, cwd=tmp_path,
                          timeout=PROMPT_TIMEOUT * 2)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = done.stdout.strip().splitlines()
    assert first == "[125]", done.stdout  # 4! + 100 + 1 rank
    assert "class Point is defined in __main__" in second and "define it in a module" in second, second


def test_functions_that_cannot_go_by_name_go_by_value_with_their_closure_defaults_and_recursion():
    """What shipping.dumps sends for a nested function (by its code) comes back whole: closure, defaults,
    keyword defaults, attributes, and a recursive reference to itself through its closure."""
    from multihead.distributed.shipping import dumps

    base = 3

    def countdown(n, step=1, *, stop=0):
        return [] if n <= stop else [n * base] + countdown(n - step, step, stop=stop)

    countdown.note = "kept"
    again = pickle.loads(dumps(countdown))
    assert again is not countdown and again(4, stop=1) == countdown(4, stop=1) == [12, 9, 6]
    assert again.note == "kept" and again.__qualname__ == countdown.__qualname__
    with pytest.raises(TypeError, match="args must be a tuple"):
        run_local(cases.rank, 2, args=5)
