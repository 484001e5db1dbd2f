"""The soak (tests/soak.py), short: 4 processes x 4 threads on PostgreSQL while Redis restarts and pauses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
DURATION = 12  # seconds of chaos; start-up and the final check add a few: the test takes < 40 s


@pytest.mark.postgres
def test_soak_under_redis_restarts_and_pauses(pg_sync_url: str) -> None:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is not installed; CI must provide it")
        pytest.skip("redis-server is not installed")
    env = dict(os.environ, SQLACACHE_TEST_PG_URL=pg_sync_url)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.soak", "--duration", str(DURATION), "--grace", "25"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The soak bounds itself (workers are killed after the run plus --grace); this is a last
        # resort, and SIGTERM lets it stop its redis-server and drop its schema.
        out, err = proc.communicate(timeout=DURATION + 60)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
        err += "\n(the soak did not finish in time and was terminated)"
    print(out)
    print(f"(the soak took {time.monotonic() - started:.1f} s)")
    if proc.returncode != 0:
        print(err[-20000:], file=sys.stderr)
    assert proc.returncode == 0, f"the soak failed (exit {proc.returncode}); its table and log are above"
