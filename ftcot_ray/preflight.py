"""Checks a run can make before any work: inputs exist, the key is set, the student can be loaded.

A paper preset on a machine without hub access stops here, at the point where a download
would start, and says so, instead of failing an hour into the run.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Config
from .errors import ConfigError, FtcotError


def _hub_files_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def check_student(cfg: Config) -> dict:
    ref = cfg.student.pretrained
    if not ref:
        return {"student": f"{cfg.student.arch}-{cfg.student.size} built from a config, tokenizer trained locally", "ok": True}
    if Path(ref).expanduser().is_dir():
        if not (Path(ref).expanduser() / "config.json").is_file():
            return {"student": f"{ref}: folder has no config.json (not a save_pretrained folder)", "ok": False}
        return {"student": f"pretrained from local folder {ref}", "ok": True}
    if _hub_files_cached(ref):
        return {"student": f"pretrained {ref} from the local Hugging Face cache", "ok": True}
    if _hub_offline():
        return {"student": f"{ref!r} is a hub id that would be downloaded here, and HF_HUB_OFFLINE=1: "
                           f"stop before the download (give a local folder in student.pretrained)", "ok": False}
    return {"student": f"{ref!r} will be downloaded from the Hugging Face hub at train time", "ok": True}


def check_teacher(cfg: Config) -> dict:
    from .artifacts import is_done, stage_dir

    t = cfg.teacher
    if is_done(cfg, stage_dir(cfg, "teach")):
        return {"teacher": "completions already in the run folder: no teacher call needed", "ok": True}
    if t.base_url is None:
        if t.sim.mode == "replay" and not (t.sim.replay_path and Path(t.sim.replay_path).exists()):
            return {"teacher": f"teacher.sim.replay_path {t.sim.replay_path!r} does not exist", "ok": False}
        return {"teacher": f"local teacher-sim ({t.sim.mode}) started on a free 127.0.0.1 port", "ok": True}
    if not os.environ.get(t.api_key_env):
        return {"teacher": f"{t.base_url} needs an API key in the environment variable {t.api_key_env}, which is not set",
                "ok": False}
    return {"teacher": f"{t.model} at {t.base_url} (key from ${t.api_key_env})", "ok": True}


def check_data(cfg: Config) -> dict:
    """Load the data as the data stage will (a benchmark: well under a second; your own data: its files
    listed and the first records of the first one checked), and say whether it can be trained on."""
    from .artifacts import is_done, stage_dir
    from .stages.data import build
    from .tasks.custom import is_custom

    if is_done(cfg, stage_dir(cfg, "data")):
        return {"data": "problems already in the run folder", "ok": True}
    if is_custom(cfg.data):
        return check_own_data(cfg)
    try:
        rows, split, notes = build(cfg)
    except (FtcotError, OSError) as e:
        return {"data": str(e), "ok": False}
    if not split.get("train"):
        return {"data": f"{cfg.data.dataset}: no train split to fine-tune on ({'; '.join(notes)})", "ok": False}
    return {"data": f"{cfg.data.dataset}: {len(split['train'])} train / {len(split.get('test', []))} test questions",
            "ok": True}


def check_own_data(cfg: Config, first: int = 1000) -> dict:
    """Your own data: the files are there, and the first records of the first one read and check as the
    data stage will read them (the rest is read by the data stage itself, streamed)."""
    from itertools import islice

    from . import storage
    from .readers import file_format, location, records
    from .tasks.custom import _answer_format, check_record, source_listing, split_folders

    try:
        fmt = _answer_format(cfg.data)
        listing = source_listing(str(cfg.data.source))
        path = listing[0][0]
        kind = file_format(path)
        split = split_folders(str(cfg.data.source), [path])[0]
        if storage.is_uri(path):
            fs, p = storage.filesystem(path)
            stream = fs.open_input_stream(p)
        else:
            stream = open(path, "rb")
        with stream:
            n = 0
            for n, (k, rec) in enumerate(islice(records(stream, kind, path), first), 1):
                check_record(rec, location(path, kind, k), fmt, cfg.data.choices, split)
    except (FtcotError, OSError) as e:
        return {"data": str(e), "ok": False}
    return {"data": f"{cfg.data.dataset}: {len(listing)} file(s); the first {n} records of {path} check out "
                    "(the data stage reads and checks every record)", "ok": True}


def check_run_dir(cfg: Config) -> dict:
    """The run folder can be written (checked without creating it)."""
    import tempfile

    from . import storage

    if storage.is_uri(cfg.run_dir):
        problem = storage.check_writable(cfg.run_dir)
        if problem:
            return {"run_dir": f"run_dir {cfg.run_dir} cannot be written ({problem}): check the URI and the "
                               "credentials in the environment (AWS_* / GOOGLE_APPLICATION_CREDENTIALS)", "ok": False}
        return {"run_dir": f"{cfg.run_dir} is writable (stages work in the local mirror {storage.mirror_of(cfg.run_dir)})",
                "ok": True}
    path = Path(cfg.run_dir).resolve()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        if existing is None or not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        fd, probe = tempfile.mkstemp(prefix=".ftcot-probe-", dir=existing)  # os.access says yes to root
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return {"run_dir": f"run_dir {cfg.run_dir} is not writable ({e.strerror or e}): choose another run_dir",
                "ok": False}
    return {"run_dir": f"{cfg.run_dir} is writable", "ok": True}


def preflight(cfg: Config, strict: bool = False) -> list[dict]:
    checks = [check_run_dir(cfg), check_data(cfg), check_teacher(cfg), check_student(cfg)]
    bad = [next(v for k, v in c.items() if k != "ok") for c in checks if not c["ok"]]
    if strict and bad:
        raise ConfigError("preflight failed before any work:\n  " + "\n  ".join(bad))
    return checks
