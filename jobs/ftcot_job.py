"""Entrypoint for `ray job submit`: the `ftcot` CLI, with the checks a cluster needs first.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/ftcot_job.py run --config quickstart run_dir=/mnt/shared/runs/quickstart

Any command works the same way (`run`, `data`, `teach`, `curate`, `train`, `eval`, `tune`, `serve`,
`report`): the arguments are the CLI's, parsed by ftcot_ray/cli.py. Inside a job Ray sets
RAY_ADDRESS, so `init_ray` joins the cluster instead of starting one.

What differs from a laptop, and why this file exists:
* The job runs in a copy of your checkout that Ray unpacked on the head node
  (`.../runtime_resources/working_dir_files/_ray_pkg_<hash>`). A relative `run_dir`,
  `teacher.cache_dir` or `train.storage_path` would land there: on one node only (training workers
  and eval replicas on other nodes could not see it), and in a new folder whenever the code changes
  (so nothing would ever be reused). They are refused here, with the key named: give a path on
  storage every node sees (the cluster files mount one at /mnt/shared).
* Presets name the paper's data as `../shared/...` (the checkout beside a `shared/` folder). The job's
  copy has nothing beside it, so with FTCOT_SHARED set in the cluster's environment (the folder that
  holds `datasets/`; cluster/*.yaml set it to /mnt/shared) every `../shared/...` value of the config is
  mapped to `$FTCOT_SHARED/...` and checked to exist; without it, the job stops and says which keys need
  it. Paths given as command-line flags (`--source`, `--in`, `--out`) are not mapped: give those absolute.
Secrets: the teacher key is never an argument or in the runtime env; the cluster's environment holds
it (README, "On a cluster"), and the config only names the variable (teacher.api_key_env).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir's ftcot_ray wins

from ftcot_ray.config import Config, with_overrides  # noqa: E402
from ftcot_ray.errors import ConfigError  # noqa: E402

SHARED = "../shared"
OUTPUT_KEYS = ("run_dir", "teacher.cache_dir", "train.storage_path")  # written by several nodes


def is_shared_ref(value: object) -> bool:
    return isinstance(value, str) and (value == SHARED or value.startswith(SHARED + "/"))


def shared_refs(tree: dict, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of every config value that points into ../shared (a list counts whole)."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= shared_refs(v, key + ".")
        elif is_shared_ref(v) or (isinstance(v, list) and any(is_shared_ref(x) for x in v)):
            out[key] = v
    return out


def _get(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _where() -> str:
    return f"this job's working dir {Path.cwd()} (Ray's copy of your checkout on host {socket.gethostname()})"


def local_output_problems(cfg: Config) -> list[str]:
    out = []
    for key in OUTPUT_KEYS:
        value = _get(cfg, key)
        if value and "://" not in value and not Path(value).is_absolute():
            out.append(f"{key}={value} is relative: it would resolve inside {_where()}, which other nodes do not "
                       f"see and a new submission does not reuse; give a path on storage every node sees, "
                       f"e.g. {key}=/mnt/shared/runs/{cfg.name}" + ("/teacher_cache" if key != "run_dir" else ""))
    return out


def map_shared(cfg: Config) -> tuple[dict[str, object], list[str]]:
    """(overrides that turn ../shared/... into $FTCOT_SHARED/..., problems)."""
    refs = shared_refs(cfg.model_dump(mode="json"))
    if not refs:
        return {}, []
    root = os.environ.get("FTCOT_SHARED")
    if not root:
        if Path(SHARED).is_dir():  # a working dir that has ../shared beside it (e.g. a hand-made layout)
            return {}, []
        keys = ", ".join(f"{k}={v}" for k, v in refs.items())
        return {}, [f"{keys}: {SHARED} is not beside {_where()}. Set FTCOT_SHARED in the cluster's environment "
                    f"to the folder every node sees that holds datasets/ (cluster/*.yaml: /mnt/shared), "
                    f"or give absolute paths"]

    def mapped(v):
        if isinstance(v, list):
            return [mapped(x) for x in v]
        return str(Path(root) / v[len(SHARED):].lstrip("/")) if is_shared_ref(v) else v

    overrides = {k: mapped(v) for k, v in refs.items()}
    problems = []
    for k, v in overrides.items():
        for path in v if isinstance(v, list) else [v]:
            if isinstance(path, str) and path.startswith(root) and not Path(path).exists():
                problems.append(f"{k}: {path} does not exist on host {socket.gethostname()} "
                                f"(mapped from {SHARED} with FTCOT_SHARED={root})")
    return overrides, problems


def on_cluster(cfg: Config) -> Config:
    """The CLI's `prepare` hook: refuse node-local outputs, map ../shared, say all problems at once."""
    overrides, problems = map_shared(cfg)
    problems = local_output_problems(cfg) + problems
    if problems:
        raise ConfigError("this config cannot run as a cluster job:\n  " + "\n  ".join(problems))
    if overrides:
        print("ftcot job: " + ", ".join(f"{k} -> {v}" for k, v in overrides.items()) + " (FTCOT_SHARED)",
              file=sys.stderr, flush=True)
        cfg = with_overrides(cfg, overrides)
    return cfg


if __name__ == "__main__":
    from ftcot_ray.cli import main

    sys.exit(main(prepare=on_cluster))
