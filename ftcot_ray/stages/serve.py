"""`ftcot serve`: host students behind an OpenAI-compatible API with Ray Serve.

    ftcot serve --config quickstart                       # the run's trained students
    ftcot serve serve.students='{coin: runs/quickstart/train/<key>/student, ma: /models/ma-t5}'
    ftcot serve --detach ...                              # leave it running on a Ray cluster

The recipe: which students (serve/students.py), the key check, Ray, Serve's HTTP proxy on
`serve.host:serve.port`, the application (serve/app.py), then the base URL and the model ids on
the terminal; it runs until Ctrl-C (or SIGTERM) and shuts Serve down. `--detach` returns once
the application is up and leaves it to the cluster (`serve shutdown` stops it); it needs a
cluster that outlives this command, so not a local Ray started here.
"""

from __future__ import annotations

import os
import signal
import time

from ..config import Config
from ..errors import ConfigError
from ..logs import say

STAGE = "serve"


def run(cfg: Config, detach: bool = False) -> dict:
    from ..serve.app import build_application
    from ..serve.students import resolve

    served, missing = resolve(cfg)
    for m in missing:
        say(f"serve: {m['id']} is not trained yet ({m['why']}); serving the others")
    if detach and not cluster_address(cfg):
        raise ConfigError("--detach leaves the students running on a Ray cluster, and this command would start a "
                          "local Ray that stops with it: start one (`ray start --head`) and set RAY_ADDRESS (or "
                          "resources.address), or drop --detach")
    app = build_application(cfg, served, key_required=cfg.serve.api_key_env is not None)

    from ray import serve

    from ..ray_utils import init_ray

    init_ray(cfg)
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(app, name=s.app_name, route_prefix=s.route_prefix)
    url = base_url(cfg)
    summary = {"stage": STAGE, "base_url": url, "models": {m.id: m.folder for m in served},
               "missing": [m["id"] for m in missing], "auth": s.api_key_env is not None, "detached": detach}
    say(f"serving {len(served)} student(s) at {url}  (OpenAI-compatible; GET {url}/models)")
    for m in served:
        say(f"  {m.id:<36} {m.card.family}, {m.card.method}, {m.card.dataset}  <- {m.folder}")
    if detach:
        say(f"left running on the cluster (application {s.app_name!r}); stop it with `serve shutdown` "
            f"or `serve.delete({s.app_name!r})`")
        return summary
    say("Ctrl-C stops it")
    wait_for_interrupt()
    serve.shutdown()
    say("serve: stopped; Serve shut down")
    return summary | {"stopped": True}


def base_url(cfg: Config) -> str:
    s = cfg.serve
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    return f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}/v1"


def cluster_address(cfg: Config) -> str | None:
    return cfg.resources.address or os.environ.get("RAY_ADDRESS")


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM (a `kill`, a container stop): both end in a clean shutdown."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
