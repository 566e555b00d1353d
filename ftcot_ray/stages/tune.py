"""`ftcot tune`: Ray Tune searches the config's own keys (lr, D, student, steps...) on VALIDATION.

    ftcot tune --config quickstart tune.num_samples=8 [--resume]

    check the space (grammar + every value as a config: errors name the key, before any work)
    data -> teach (once, at D_max = teacher.samples)  -> curate at every D the space can draw
    Tune: each trial = curate(D) -> train (TorchTrainer, validation reports to Tune; ASHA may stop it)
    trials table + plots -> the best trial on validation -> its student evaluated on TEST (only it)
    -> the registry entry <run_dir>/best/<dataset>/ (tune/registry.py)

The search folder `<run_dir>/tune/<key>/` is keyed by the tune section and the base config's stage
keys; a finished search is reused, an interrupted one continues with `--resume` (Tuner.restore:
finished trials are kept). Trials never ask the teacher: a space key that would change the data or
teach stage is refused when the config loads. With `tune.study_by` every finished trial is also
evaluated on test and the study table (mean +- std per value) is written: a measurement, not a choice.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from ..artifacts import digest, finish, is_complete, read_manifest, stage_dir, stage_key
from ..config import Config, TuneConfig, with_overrides
from ..errors import ConfigError, DataError
from ..logs import say
from ..tune import registry, results, search
from ..tune.space import Dist, check_search, parse_space

STAGE = "tune"
MAX_CHECKED = 256  # configurations checked one by one before the search (beyond: each key alone)


def run(cfg: Config, resume: bool = False, fault: dict | None = None) -> dict:
    """`fault` ({"marker": path}): the first trial fails once (the retry test)."""
    from . import curate, data, evaluate, teach
    from ..ray_utils import init_ray

    t0 = time.time()
    space = check_space(cfg)
    out = search_dir(cfg)
    if is_complete(out):
        return read_manifest(out)["summary"] | {"reused": True}
    if search.interrupted(out) and not resume:
        raise ConfigError(f"an interrupted search is in {out}: `ftcot tune --resume` (same config) continues it and "
                          "keeps its finished trials; delete that folder to start over")
    init_ray(cfg)
    data.run(cfg)
    taught = teach.run(cfg)  # the teacher's only requests: D_max samples per question, before any trial
    for c in curate_variants(cfg, space):
        curate.run(c)  # trials then only read these (a trial's own curate.run is reused)
    packing = search.concurrency(cfg)
    say(f"tune: {cfg.tune.search} search, {cfg.tune.samples()} sample(s), {packing['concurrent_trials']} trial(s) at "
        f"once x {packing['cpus_per_trial']:g} CPUs (cluster: {packing['cluster_cpus']:g}); {out}")
    search.tuner(cfg, space, out, resume, fault).fit()

    rows = results.trial_rows(cfg, out / search.EXPERIMENT, out, list(space))
    files = results.write_tables(out, rows, list(space)) + results.plot(out, rows)
    best = results.best(rows, cfg.tune.metric)
    if best is None:
        raise DataError(f"no trial of the search finished: see {out / 'trials.md'} and the log")
    best_cfg = with_overrides(cfg, {k: best[k] for k in space} | {"eval.split": "test"})
    (out / "best_config.yaml").write_text(Path(best["config"]).read_text())
    test = evaluate.run(best_cfg)  # the test split, for the chosen student only
    entry = registry.register(best_cfg, stage_dir(best_cfg, "train"), _eval_metrics(best_cfg),
                              {"search_dir": str(out), "trial_id": best["trial_id"],
                               "params": {k: best[k] for k in space}})
    summary = {"search_dir": str(out), "trials": len(rows), "finished": sum(r["status"] == "finished" for r in rows),
               "best_trial": best["trial_id"], "best_params": {k: best[k] for k in space},
               "val_accuracy": best["val_accuracy"], "test_accuracy": test.get("accuracy"), "registry": str(entry),
               "teach_reused": bool(taught.get("reused")), **packing, "table": str(out / "trials.md"),
               "files": [str(f) for f in files]}
    if cfg.tune.study_by:
        summary["study"] = study(cfg, rows, list(space), out)
    summary["wall_s"] = round(time.time() - t0, 1)
    finish(out, cfg, STAGE, summary=summary)
    return summary


def check_space(cfg: Config) -> dict[str, Dist]:
    """The space parsed, checked against the search algorithm, and every value tried as a config."""
    tc = cfg.tune
    if not tc.space:
        raise ConfigError("tune.space is empty: give at least one key, e.g. tune.space.train.lr='loguniform(1e-4, 3e-3)'")
    try:
        space = parse_space(tc.space)
        check_search(space, tc.search)
    except ValueError as e:
        raise ConfigError(f"tune.space.{e}") from None
    if tc.study_by and tc.study_by not in space:
        raise ConfigError(f"tune.study_by={tc.study_by}: not a key of tune.space ({', '.join(space)})")
    keys = list(space)
    combos = list(itertools.islice(itertools.product(*(space[k].probes() for k in keys)), MAX_CHECKED + 1))
    if len(combos) > MAX_CHECKED:  # too many to try all: each value alone
        combos = [{k: v} for k in keys for v in space[k].probes()]
    else:
        combos = [dict(zip(keys, c)) for c in combos]
    for combo in combos:
        try:
            with_overrides(cfg, combo)
        except ConfigError as e:
            named = ", ".join(f"tune.space.{k}={v}" for k, v in combo.items())
            raise ConfigError(f"{named}: a trial with these values would be an invalid config:\n{e}") from None
    return space


def search_dir(cfg: Config) -> Path:
    """`<run_dir>/tune/<key>`: the tune fields that shape the search and the base config's stage keys."""
    tc = cfg.tune
    fields = {name: getattr(tc, name) for name, info in TuneConfig.model_fields.items()
              if not (info.json_schema_extra or {}).get("runtime")}
    key = digest({"tune": fields, "stages": {s: stage_key(cfg, s) for s in ("curate", "train", "eval")}})
    return Path(cfg.run_dir) / STAGE / key


def curate_variants(cfg: Config, space: dict[str, Dist], limit: int = 64) -> list[Config]:
    """One config per distinct curate folder the space can ask for (D values, ...), when it can list them."""
    keys = [k for k in space if "curate" in TuneConfig.stages_of(k)]
    supports = [space[k].support() for k in keys]
    combos = [] if any(s is None for s in supports) else list(itertools.islice(itertools.product(*supports), limit + 1))
    if not combos or len(combos) > limit:
        return [cfg]  # continuous or too many: each trial curates its own (under a lock)
    by_key = {}
    for combo in combos:
        c = with_overrides(cfg, dict(zip(keys, combo)))
        by_key.setdefault(stage_key(c, "curate"), c)
    return list(by_key.values())


def study(cfg: Config, rows: list[dict], keys: list[str], out: Path) -> dict:
    """Every finished trial on TEST; mean +- std per value of tune.study_by (a measurement, not a choice)."""
    from . import evaluate

    key = cfg.tune.study_by
    for r in rows:
        if r["status"] == "finished":
            c = with_overrides(cfg, {k: r[k] for k in keys} | {"eval.split": "test"})
            r["test_accuracy"] = evaluate.run(c).get("accuracy")
            say(f"tune study: trial {r['trial_id']} {key}={r[key]}: test acc {r['test_accuracy']:.4f}")
    table = results.study_table(rows, key)
    title = (f"{cfg.name}: test accuracy vs {key} ({cfg.data.dataset}, {cfg.data.train_size} questions, "
             f"difficulty {cfg.data.difficulty})")
    files = results.write_study(out, table, key, title)
    results.write_tables(out, rows, keys)  # again, now with the test column filled
    return {"by": key, "table": table, "files": [str(f) for f in files]}


def _eval_metrics(cfg: Config) -> dict:
    import json

    return json.loads((stage_dir(cfg, "eval") / "metrics.json").read_text())
