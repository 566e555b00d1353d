"""The Serve application: an OpenAI ingress in front of one StudentServer deployment per model id.

Built two ways, from the same function:

* `ftcot serve --config quickstart ...` (stages/serve.py) builds it from a loaded config;
* Serve builds it by import path, with the application's `args` (a dict):

      serve run ftcot_ray.serve.app:build_app config=quickstart
      serve run cluster/serve_config.yaml        # or `serve deploy` it / a KubeRay RayService

  `args`: `config` (a preset or a YAML path), `overrides` (a list of `key=value`, or one string
  of them separated by spaces), and any dotted key as one more override
  (`serve.students={...}`). Where Serve builds it, `serve.host` / `serve.port` /
  `serve.route_prefix` do not apply: Serve's own `http_options` and the application's
  `route_prefix` do.

Each student deployment gets its resources, concurrency, queue limit and autoscaling from
`serve.*`; its replicas load the model once and batch requests (server.py).
"""

from __future__ import annotations

import hashlib
import re
import shlex
from typing import Any

from ray import serve

from ..config import Config, load_config
from ..errors import ConfigError
from .auth import key_check
from .ingress import OpenAIIngress
from .server import StudentServer
from .students import Served, resolve


def build_app(args: dict | None = None) -> serve.Application:
    """Serve's application builder (`import_path: ftcot_ray.serve.app:build_app`)."""
    cfg = config_from_args(args)
    served, missing = resolve(cfg)
    for m in missing:  # the builder's log: `serve run` shows it
        import logging

        logging.getLogger("ray.serve").warning("ftcot: not served (not trained yet): %s at %s: %s",
                                               m["id"], m["folder"], m["why"])
    return build_application(cfg, served)


def config_from_args(args: dict | None) -> Config:
    args = dict(args or {})
    source = args.pop("config", None)
    overrides = args.pop("overrides", None) or []
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError("application args: `overrides` must be a list of key=value strings (or one string)")
    extra = []
    for key, value in args.items():
        if "." not in key:
            raise ConfigError(f"application args: unknown argument {key!r}; use config, overrides, or a dotted "
                              f"config key (serve.students=...)")
        extra.append(f"{key}={value}" if isinstance(value, str) else {key: value})
    strings = list(overrides) + [e for e in extra if isinstance(e, str)]
    cfg = load_config(source, strings)
    raw = {k: v for e in extra if isinstance(e, dict) for k, v in e.items()}
    if raw:
        from ..config import with_overrides

        cfg = with_overrides(cfg, raw)
    return cfg


def build_application(cfg: Config, served: list[Served], *, key_required: bool = False) -> serve.Application:
    s = cfg.serve
    if not served:
        raise ConfigError("nothing to serve: serve.students is empty and the run has no trained student")
    handles = {m.id: student_deployment(cfg, m) for m in served}
    settings = {"max_tokens": s.max_tokens, "max_n": min(s.max_n, s.max_batch_size), "max_body_bytes": s.max_body_bytes,
                "retry_after_s": s.retry_after_s, "api_key_env": s.api_key_env,
                "key_check": key_check(s.api_key_env, required=key_required)}
    ingress = OpenAIIngress.options(
        name="OpenAIIngress", num_replicas=s.ingress_replicas, max_ongoing_requests=s.ingress_max_ongoing_requests,
        max_queued_requests=-1, ray_actor_options={"num_cpus": s.ingress_cpus})
    return ingress.bind(served, handles, settings)


def student_deployment(cfg: Config, m: Served) -> serve.Application:
    s = cfg.serve
    threads = s.torch_threads or max(1, int(s.cpus_per_replica))
    options: dict[str, Any] = dict(
        name=deployment_name(m.id),
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
    )
    if s.max_replicas > s.min_replicas or s.min_replicas == 0:
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests, "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s, "look_back_period_s": s.look_back_period_s}
        if s.metrics_interval_s is not None:  # deprecated in Serve in favour of env vars, still honoured
            options["autoscaling_config"]["metrics_interval_s"] = s.metrics_interval_s
    else:
        options["num_replicas"] = s.min_replicas
    return StudentServer.options(**options).bind(m.id, m.folder, s.max_batch_size, s.batch_wait_timeout_s, threads,
                                                 s.gpus_per_replica > 0)


def deployment_name(model_id: str) -> str:
    """A Serve deployment name for a model id (ids may hold `/` or `:`; the hash keeps them distinct)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", model_id)[:48]
    return f"student-{safe}-{hashlib.sha1(model_id.encode()).hexdigest()[:6]}"
