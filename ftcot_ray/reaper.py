"""A watchdog that leaves no process behind when a run that started its own local Ray ends.

`python -m ftcot_ray.reaper DRIVER_PID` runs in its own session (so a kill of the driver's
process group does not reach it). While the driver lives it notes the driver's descendants (Ray's
GCS, raylet, agents, workers, a local teacher-sim); once the driver is gone, however it ended
(normal exit, Ctrl-C, SIGKILL), it kills those that are still alive, their children, and any process
whose command line names the Ray session those processes belong to. Ray's
dashboard and runtime-env agents ignore SIGTERM, and fan-out actors would keep sending teacher
requests after a SIGKILL of the driver, so SIGKILL it is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import psutil

POLL_S = 0.25
# Ray's GCS, raylet and a starting worker name their session folder on the command line.
_SESSION = re.compile(r"/session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_\d+")
# ...and run Ray's own code; a person's `tail -f` of the session's logs is left alone.
_RAY_CODE = re.compile(r"/ray/(_private|core|dashboard|autoscaler)/")


_LAUNCH = ("import subprocess, sys; print(subprocess.Popen([sys.executable, '-m', 'ftcot_ray.reaper', sys.argv[1]], "
           "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, "
           "close_fds=True).pid)")


def start(driver_pid: int | None = None) -> int:
    """Start the watchdog for this process (or `driver_pid`); returns its pid.

    Through a short-lived middle process, so the watchdog is not the driver's child: when a driver
    dies, Ray's raylet kills that process's children, and it took a child watchdog with them
    before it could reap the agents (seen here: DashboardAgent and RuntimeEnvAgent left behind).
    """
    launched = subprocess.run([sys.executable, "-c", _LAUNCH, str(driver_pid or os.getpid())],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True)
    return int(launched.stdout)


def _note(driver: psutil.Process, known: dict[int, float], sessions: set[str]) -> None:
    try:
        for p in driver.children(recursive=True):
            try:
                if p.pid not in known:
                    known[p.pid] = p.create_time()
                    sessions.update(_SESSION.findall(" ".join(p.cmdline())))
            except psutil.Error:
                pass
    except psutil.Error:
        pass


def _of_sessions(sessions: set[str] | frozenset[str]) -> list[psutil.Process]:
    """Processes that name one of `sessions` on their command line.

    Why: a worker the raylet forked in the last poll before a SIGKILL was never noted, and once the
    raylet is dead it is nobody's child; still starting up, it is in its own process group, names the
    session on its command line, and would wait a minute for a GCS that is gone (seen in CI).
    """
    if not sessions:
        return []
    out = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or ())
        if p.pid != os.getpid() and _RAY_CODE.search(line) and any(s in line for s in sessions):
            out.append(p)
    return out


def _alive(known: dict[int, float]) -> list[psutil.Process]:
    out = []
    for pid, created in known.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 0.01:  # the same process, not a reused pid
                out.append(p)
        except psutil.Error:
            pass
    return out


def reap(known: dict[int, float], sessions: set[str] | frozenset[str] = frozenset()) -> int:
    """Kill what is left of the noted processes, everything they started since, and every process of
    their Ray sessions; returns the count."""
    victims: dict[int, psutil.Process] = {}
    for p in _alive(known) + _of_sessions(sessions):
        victims[p.pid] = p
        try:
            for c in p.children(recursive=True):
                victims.setdefault(c.pid, c)
        except psutil.Error:
            pass
    for p in victims.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims.values()), timeout=5)
    return len(victims)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch(driver_pid: int) -> int:
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return 0
    known: dict[int, float] = {}
    sessions: set[str] = set()
    while _running(driver):
        _note(driver, known, sessions)
        time.sleep(POLL_S)
    time.sleep(1.0)  # a normal exit shuts Ray down itself: give it a moment, then take what is left
    return reap(known, sessions)


if __name__ == "__main__":
    sys.exit(0 if watch(int(sys.argv[1])) >= 0 else 1)
