"""Where the search runs: Ray Tune's Tuner around the trial function (trial.py).

* Search: random (Tune's BasicVariantGenerator, seeded), grid (every discrete value crossed) or
  Optuna's TPE (`tune.search=optuna`, Ray Tune's OptunaSearch; `pip install 'ftcot-ray[tune]'`).
* Scheduler: FIFO, or ASHA on the `val_accuracy` (or `val_loss`) each validation reports, against
  the training `step` (not Tune's iteration count: a re-reported step must not look like progress).
* Resources: the trial function only waits on its TorchTrainer, so it asks for 0 CPUs (a trial that
  held 1 CPU would starve its own workers on a 2-core machine: DESIGN.md) and a little memory;
  the trials at once are as many as the cluster's CPUs hold at train.num_workers x
  train.cpus_per_worker each (or tune.max_concurrent_trials).
* Failures: a failed trial is retried `tune.max_failures` times (its train stage resumes from its
  last Ray Train checkpoint); `ftcot tune --resume` restores the experiment (Tuner.restore), whose
  finished trials are kept, not run again.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import Config
from ..errors import ConfigError
from ..logs import say
from .space import Dist

EXPERIMENT = "ray_tune"  # the Tune experiment's folder inside the search folder


def mode_of(metric: str) -> str:
    return "min" if metric == "val_loss" else "max"


def param_space(space: dict[str, Dist], search: str) -> dict:
    """Our distributions as Tune's (randint's upper end is exclusive in Tune, included in ours)."""
    from ray import tune

    out = {}
    for key, d in space.items():
        if d.kind == "grid" or (search == "grid" and d.discrete):
            out[key] = tune.grid_search(d.support(limit=10**9))
        elif d.kind == "choice":
            out[key] = tune.choice(list(d.values))
        elif d.kind == "randint":
            out[key] = tune.randint(int(d.lo), int(d.hi) + 1)
        elif d.kind == "uniform":
            out[key] = tune.uniform(d.lo, d.hi)
        else:
            out[key] = tune.loguniform(d.lo, d.hi)
    return out


def searcher(cfg: Config):
    """The search algorithm, capped at the concurrent trials the cluster fits (the one place the cap is set:
    Tune's TuneConfig.max_concurrent_trials would reach a Searcher only, never the random/grid generator)."""
    tc = cfg.tune
    cap = concurrency(cfg)["concurrent_trials"]
    if tc.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch

            import optuna  # noqa: F401  (OptunaSearch only fails later, inside the run, without it)
        except ImportError:
            raise ConfigError("tune.search=optuna needs optuna: pip install 'ftcot-ray[tune]'") from None
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(OptunaSearch(metric=tc.metric, mode=mode_of(tc.metric), seed=tc.seed), cap)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=tc.seed, max_concurrent=cap)


def scheduler(cfg: Config, space: dict[str, Dist]):
    tc = cfg.tune
    if tc.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # metric and mode come from the Tuner's TuneConfig (Tune refuses them twice). stop_last_trials=False:
    # a trial that reaches max_t has just trained its last step, and stopping it there would kill it
    # before it exports its student; it ends by itself a moment later.
    return ASHAScheduler(time_attr="step", max_t=max_steps(cfg, space), stop_last_trials=False,
                         grace_period=tc.grace_steps or cfg.train.eval_every_steps or 1,
                         reduction_factor=tc.reduction_factor)


def max_steps(cfg: Config, space: dict[str, Dist]) -> int:
    """ASHA's horizon: the longest run the space can ask for (no trial is cut short by it)."""
    d = space.get("train.max_steps")
    if d is not None:
        return int(max(d.probes()))
    return cfg.train.max_steps or 10**9  # epochs-based: the horizon is only an upper bound


def trial_cpus(cfg: Config) -> float:
    return cfg.train.num_workers * cfg.train.cpus_per_worker


def concurrency(cfg: Config) -> dict:
    """How many trials run at once: what the cluster's CPUs hold, or tune.max_concurrent_trials."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0))
    per_trial = trial_cpus(cfg)
    fits = int(cpus // per_trial)
    if fits < 1 and not cfg.tune.max_concurrent_trials:
        raise ConfigError(f"one trial needs train.num_workers x train.cpus_per_worker = {per_trial:g} CPUs and the "
                          f"cluster has {cpus:g}: lower train.num_workers (or resources.num_cpus for a local Ray)")
    n = cfg.tune.max_concurrent_trials or fits
    return {"cluster_cpus": cpus, "cpus_per_trial": per_trial, "concurrent_trials": n}


def trainable(cfg: Config, search_dir: Path, fault: dict | None = None):
    from ray import tune

    from .trial import run_trial

    fn = tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), search_dir=str(search_dir.resolve()),
                              cwd=os.getcwd(), fault=fault)
    return tune.with_resources(fn, {"cpu": 0, "memory": cfg.tune.trial_memory_mb * 2**20})


def callbacks(cfg: Config) -> list:
    out = [TrialLines()]
    if cfg.report.mlflow_uri:
        try:
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("report.mlflow_uri is set but mlflow is not installed: pip install 'ftcot-ray[mlflow]' "
                              "(or unset report.mlflow_uri)") from None
        uri = cfg.report.mlflow_uri
        out.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=cfg.report.mlflow_experiment,
                                        tags={"ftcot": "tune"}, save_artifact=False))
    return out


def tuner(cfg: Config, space: dict[str, Dist], search_dir: Path, resume: bool, fault: dict | None = None):
    """A new Tuner, or (resume) the interrupted experiment in `search_dir` restored."""
    from ray import tune

    from ..logs import verbose

    if not verbose():  # Tune's new console output prints its banner even at verbose=0; the old one is silent
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    uri = cfg.report.mlflow_uri
    if uri and (uri.startswith("file:") or "://" not in uri):
        # mlflow 3 refuses its local file store unless asked (as stages/report.py does); set before a
        # restore too, whose MLflow callback comes back from the pickled experiment
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    path = search_dir.resolve() / EXPERIMENT
    fn = trainable(cfg, search_dir, fault)
    if resume and tune.Tuner.can_restore(str(path)):
        say(f"tune: resuming the search in {path} (finished trials are kept)")
        return tune.Tuner.restore(str(path), trainable=fn, resume_unfinished=True, resume_errored=True)
    tc = cfg.tune
    return tune.Tuner(
        fn,
        param_space=param_space(space, tc.search),
        tune_config=tune.TuneConfig(metric=tc.metric, mode=mode_of(tc.metric), search_alg=searcher(cfg),
                                    scheduler=scheduler(cfg, space), num_samples=tc.samples(),
                                    reuse_actors=False),  # the concurrency cap: searcher()
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(search_dir.resolve()), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=tc.max_failures),
                                  callbacks=callbacks(cfg)),
    )


def interrupted(search_dir: Path) -> bool:
    """An experiment was started here and not finished (the search folder has no manifest yet)."""
    return (search_dir / EXPERIMENT).is_dir()


try:
    from ray.tune import Callback as _Callback
except ImportError:  # Ray without Tune installed: TrialLines is only built when tuning
    _Callback = object


class TrialLines(_Callback):
    """One line per trial for the person at the terminal (Tune's own tables are off: verbose=0)."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        how = "done" if r.get("trial_done") else "stopped early (ASHA)"
        acc = r.get("val_accuracy")
        say(f"tune: trial {trial.trial_id} {_params(trial.config)}: {how} at step {r.get('step')}, "
            f"val acc {acc if acc is None else round(acc, 4)}, {round(r.get('time_total_s') or 0, 1)} s")

    def on_trial_recover(self, iteration, trials, trial, **info):
        say(f"tune: trial {trial.trial_id} {_params(trial.config)} failed (failure {trial.num_failures}); "
            "Tune retries it")

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"tune: trial {trial.trial_id} {_params(trial.config)} failed for good "
            f"(after {trial.num_failures} attempts); the search goes on")


def _params(config: dict) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in sorted(config.items()))


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
