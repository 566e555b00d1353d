"""Running teacher-sim: in a thread or its own process for tests and the teach stage, or as
`ftcot teacher-sim`, whose flags are generated from `TeacherSimConfig` (the one declaration of the
sim's settings: a new field there is a new flag here, with its type, bounds, default and help)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path
from typing import Any, Iterator, Optional

from ...config import TeacherSimConfig, field_stages
from ...errors import ConfigError
from .sources import MODEL_DESCRIPTION, SIM_MODEL

FLAG_ALIASES = {"replay_path": ["--replay"]}  # the short spelling the README has always shown


def sim_endpoint_id(settings: TeacherSimConfig, model: str = SIM_MODEL) -> str:
    """A stable cache identity: the settings declared to change the answers (not the port, faults
    or delays, which are runtime fields), and the model name. A replay file counts by its name."""
    material: dict[str, Any] = {"model": model}
    for name in TeacherSimConfig.model_fields:
        if field_stages(TeacherSimConfig, name, "teach"):
            value = getattr(settings, name)
            material[name] = Path(value).name if name == "replay_path" and value else value
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]
    return f"teacher-sim:{settings.mode}:{digest}"


# --------------------------------------------------------------------------- serving


def _uvicorn_config(app: Any, host: str, port: int):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, loop="uvloop", http="httptools", lifespan="on",
                          log_level="warning", access_log=False, backlog=4096, timeout_keep_alive=30)


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, timeout: float = 30.0, proc: Optional[subprocess.Popen] = None) -> None:
    """Until GET /health answers (the sim's own route; a real endpoint is checked with GET /models)."""
    import urllib.error
    import urllib.request

    url = base_url.rsplit("/v1", 1)[0] + "/health"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"teacher-sim exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"teacher-sim at {base_url} not ready after {timeout:.0f}s")


@contextlib.contextmanager
def running_sim(settings: Optional[TeacherSimConfig] = None, *, model: str = SIM_MODEL, port: Optional[int] = None,
                host: str = "127.0.0.1", subprocess_mode: bool = False, processes: int = 1) -> Iterator[str]:
    """Start a teacher-sim on a free port, yield its base URL (``http://host:port/v1``), stop it on exit.

    In-process (a background thread) by default, which sees tasks registered by the caller; with
    ``subprocess_mode`` it runs ``ftcot teacher-sim`` in its own process (its own core: benchmarks;
    and the teach stage, whose reaper then takes it down with the run); with ``processes`` > 1, that
    many processes share the port (SO_REUSEPORT: the kernel spreads the connections over them), for a
    benchmark whose client outruns one sim process. Each keeps its own /stats.
    """
    settings = settings or TeacherSimConfig()
    port = port or _free_port(host)
    base_url = f"http://{host}:{port}/v1"
    if subprocess_mode:
        cmd = [sys.executable, "-m", "ftcot_ray.cli", "teacher-sim", "--host", host, "--port", str(port),
               "--model", model, "--settings-json", settings.model_dump_json()] + (["--reuse-port"] if processes > 1 else [])
        procs = [subprocess.Popen(cmd, stdout=2) for _ in range(processes)]  # banners go with the framework logs
        try:
            for proc in procs:
                wait_ready(base_url, proc=proc)
            yield base_url
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        return
    import uvicorn

    from .app import SimApp

    server = uvicorn.Server(_uvicorn_config(SimApp(settings, model), host, port))
    server.install_signal_handlers = lambda: None  # not the main thread
    thread = threading.Thread(target=server.run, name="teacher-sim", daemon=True)
    thread.start()
    try:
        wait_ready(base_url)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(10)


# --------------------------------------------------------------------------- the command line, from the model


def _arg_type(annotation: Any) -> tuple[Any, Optional[list]]:
    """(argparse type, choices) for a field's annotation: int, float, str, Literal, Optional[...]."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return _arg_type(args[0])
    return (annotation if annotation in (int, float, str) else str), None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", default=SIM_MODEL, help="the model id /v1/models lists (any name is answered)")
    for name, field in TeacherSimConfig.model_fields.items():
        kind, choices = _arg_type(field.annotation)
        flags = ["--" + name.replace("_", "-"), *FLAG_ALIASES.get(name, [])]
        default = field.get_default(call_default_factory=True)
        parser.add_argument(*flags, dest=name, type=kind, choices=choices, default=None,
                            help=f"{field.description or name} (default: {default})")
    parser.add_argument("--settings-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reuse-port", action="store_true",
                        help="bind with SO_REUSEPORT, so several teacher-sim processes can share one port")


def settings_from_args(args: argparse.Namespace) -> TeacherSimConfig:
    from pydantic import ValidationError

    try:
        if args.settings_json:
            return TeacherSimConfig.model_validate_json(args.settings_json)
        given = {k: getattr(args, k) for k in TeacherSimConfig.model_fields if getattr(args, k, None) is not None}
        return TeacherSimConfig.model_validate(given)
    except ValidationError as e:
        problems = "; ".join(f"--{'.'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"teacher-sim: {problems}") from None


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import SimApp

    settings = settings_from_args(args)
    app = SimApp(settings, args.model)
    print(f"teacher-sim ({settings.mode}) on http://{args.host}:{args.port}/v1 — {MODEL_DESCRIPTION}", flush=True)
    server = uvicorn.Server(_uvicorn_config(app, args.host, args.port))
    if not getattr(args, "reuse_port", False):
        server.run()
        return 0
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((args.host, args.port))
    server.run(sockets=[sock])
    return 0
