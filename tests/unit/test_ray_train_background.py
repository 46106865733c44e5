"""`in_background` (the training workers' data warm-up): the waiter gets the thread's exception, and a caller that
fails before waiting can still exit while the thread is blocked (a stream read may block as long as the cluster
lives)."""

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipelines.ray_train import in_background

REPO = Path(__file__).resolve().parents[2]


def test_the_waiter_gets_the_result_or_the_exception():
    seen = []
    in_background(lambda: seen.append(threading.current_thread().name), name="data-warm-up")()
    assert seen == ["data-warm-up"]

    def fails():
        raise ValueError("no shard")

    wait = in_background(fails, name="data-warm-up")
    with pytest.raises(ValueError, match="no shard"):
        wait()


def test_a_process_whose_main_thread_fails_exits_while_the_thread_blocks():
    code = (
        "import threading\n"
        "from pipelines.ray_train import in_background\n"
        "in_background(threading.Event().wait, name='blocked')\n"
        "raise SystemExit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
