"""The watchdog's reach, without Ray: what it kills after a driver dies, and what it leaves alone."""

import subprocess
import sys
import time

import psutil

from ftcot_ray import reaper

SESSION = "/tmp/ray/session_2026-12-06_18-45-28_678783_5944"
SLEEP = "import time; time.sleep(120)"


def _sleeper(*args: str) -> subprocess.Popen:
    # `python -c CODE ARGS...`: ARGS only dress the command line the way Ray's processes look.
    return subprocess.Popen([sys.executable, "-c", SLEEP, *args], start_new_session=True)


def test_a_worker_never_noted_but_naming_the_session_is_killed_and_a_log_reader_is_not():
    worker = _sleeper("/venv/site-packages/ray/_private/workers/default_worker.py", f"--session-dir={SESSION}")
    reader = _sleeper(f"{SESSION}/logs/raylet.out")  # e.g. a person's `tail -f`: not Ray's code
    other = _sleeper("/venv/site-packages/ray/_private/workers/default_worker.py",
                     "--session-dir=/tmp/ray/session_2026-12-06_18-45-28_678783_7777")  # another run's Ray
    try:
        time.sleep(0.3)
        assert reaper.reap({}, {SESSION}) == 1
        assert not psutil.pid_exists(worker.pid) or psutil.Process(worker.pid).status() == psutil.STATUS_ZOMBIE
        assert reader.poll() is None and other.poll() is None
    finally:
        for p in (worker, reader, other):
            p.kill()
            p.wait()


def test_noting_a_driver_learns_its_children_and_their_session():
    driver = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {SLEEP!r}, '/ray/core/src/ray/raylet/raylet', "
        f"'--session_dir={SESSION}']); time.sleep(120)")], start_new_session=True)
    try:
        known, sessions = {}, set()
        deadline = time.time() + 20
        while not known and time.time() < deadline:
            reaper._note(psutil.Process(driver.pid), known, sessions)
            time.sleep(0.1)
        assert len(known) == 1 and sessions == {SESSION.removeprefix("/tmp/ray")}
        driver.kill()
        driver.wait()
        assert reaper.reap(known, sessions) == 1  # the orphan, found as noted (and by its session)
        assert not reaper._alive(known)
    finally:
        driver.kill()
        driver.wait()
