"""What a person sees, and where the framework chatter goes.

The terminal gets our progress bars, one-line stage summaries, warnings that matter, the final
table. Ray's, Ray Train's, DeepSpeed's and transformers' messages, and everything Ray workers
print, go to ``<run_dir>/logs/<command>-<time>.log`` (``-v`` shows them on the terminal too).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

CHATTY = ("ray", "deepspeed", "DeepSpeed", "transformers", "torch", "httpx", "urllib3", "filelock", "uvicorn",
          "fastapi", "py.warnings", "accelerate", "peft", "mlflow")
_state: dict = {"file": None, "verbose": False, "handler": None, "console": False}


class LazyFileHandler(logging.FileHandler):
    """A file handler that creates its folder and file at the first record, so a command that ends
    before doing anything (a plan, a refused config) writes nothing into the run folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        super().__init__(str(path), encoding="utf-8", delay=True)

    def _open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def ensure_open(self):
        if self.stream is None:
            self.stream = self._open()
        return self.stream


def setup(run_dir: str | Path | None, command: str, verbose: bool = False) -> Optional[Path]:
    """Route the framework loggers to a file in the run folder (and to stderr with `verbose`)."""
    _state["verbose"] = verbose
    path = None
    handler: logging.Handler
    if run_dir is not None:
        path = Path(run_dir) / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        handler = LazyFileHandler(path)
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if _state.get("handler") is not None:  # a second command in one process: close the first one's file
        _state["handler"].close()
    _state.update(file=path, handler=handler)
    logging.captureWarnings(True)
    warnings.filterwarnings("default")
    for name in CHATTY:
        quiet(name)
    return path


def quiet(name: str) -> None:
    """Send one logger (and its children) to the log file only, unless -v."""
    handler = _state["handler"]
    if handler is None:
        return
    log = logging.getLogger(name)
    log.handlers = [handler] + ([logging.StreamHandler(sys.stderr)] if _state["verbose"] else [])
    log.propagate = False


def quiet_all() -> None:
    """Quiet every framework logger configured so far (Ray Data, Serve, Train add their own handlers on import)."""
    for name in list(logging.Logger.manager.loggerDict):
        if name.split(".")[0] in CHATTY and logging.getLogger(name).handlers:
            quiet(name)


def console_run(yes: bool = True) -> None:
    """This is a real command line (not a test calling the CLI in-process): native stderr may be redirected."""
    _state["console"] = yes


def redirect_native_stderr() -> None:
    """Send file descriptor 2 (what Ray's C++ core and child processes write) to the log file, keeping
    Python's sys.stderr (our bars and messages) on the terminal. Called when Ray starts, on a real
    command line only; once per process."""
    handler = _state["handler"]
    if _state["verbose"] or not _state["console"] or not isinstance(handler, LazyFileHandler) or _state.get("redirected"):
        return
    import os

    try:
        stream = handler.ensure_open()
    except OSError:  # an unwritable run_dir is reported by the stage that writes there
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, closefd=False)
    os.dup2(stream.fileno(), 2)
    _state["redirected"] = True


def log_file() -> Optional[Path]:
    return _state["file"]


def verbose() -> bool:
    return bool(_state["verbose"])


def write_worker_lines(data: dict) -> None:
    """A batch of lines that Ray workers printed (Ray's log-to-driver stream): to the log file."""
    handler = _state["handler"]
    if not isinstance(handler, LazyFileHandler):
        return
    who = data.get("actor_name") or data.get("task_name") or "worker"
    prefix = f"({who} pid={data.get('pid')}) "
    try:
        stream = handler.ensure_open()
    except OSError:
        return
    for line in data.get("lines", []):
        stream.write(prefix + line + "\n")
    stream.flush()


def say(message: str) -> None:
    """One line for the person at the terminal."""
    print(message, file=sys.stderr, flush=True)
