"""`tune.space`'s grammar and the checks that run before any trial: the parser itself, errors that
name the key (when the config loads, and from the command line with exit 2 and nothing written),
the translation to Ray Tune's distributions, and the pure parts of the results (best trial, study)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftcot_ray.config import ConfigError, TuneConfig, load_config
from ftcot_ray.stages import tune as tune_stage
from ftcot_ray.tune import registry, results
from ftcot_ray.tune.space import Dist, SpaceError, check_search, grid_size, parse, parse_space

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the grammar


@pytest.mark.parametrize("text,expected", [
    ("choice([1, 2, 4])", Dist("choice", values=(1, 2, 4))),
    ("choice([tiny, small])", Dist("choice", values=("tiny", "small"))),
    ("choice(1e-4, 3e-4)", Dist("choice", values=(1e-4, 3e-4))),  # varargs; `1e-4` is text to YAML 1.1
    ("grid([0.001])", Dist("grid", values=(0.001,))),
    ("grid([true, false])", Dist("grid", values=(True, False))),
    ("uniform(0, 0.1)", Dist("uniform", lo=0.0, hi=0.1)),
    ("  loguniform( 1e-4 , 3e-3 ) ", Dist("loguniform", lo=1e-4, hi=3e-3)),
    ("randint(200, 600)", Dist("randint", lo=200, hi=600)),
    ("randint(3, 3)", Dist("randint", lo=3, hi=3)),
])
def test_each_distribution_parses(text, expected):
    assert parse("train.x", text) == expected


def test_numbers_in_choices_are_numbers_and_words_stay_words():
    d = parse("k", "choice([1e-3, 2.5e-4, 8, yes_no, '3'])")
    assert d.values == (1e-3, 2.5e-4, 8, "yes_no", 3)  # a quoted number is still read as a number
    assert [type(v) for v in d.values[:3]] == [float, float, int]


def test_support_and_probes():
    assert parse("k", "randint(1, 4)").support() == [1, 2, 3, 4]  # both ends included
    assert parse("k", "loguniform(1e-4, 1e-2)").support() is None
    assert parse("k", "loguniform(1e-4, 1e-2)").probes() == [1e-4, 1e-2]
    assert parse("k", "grid([1, 2])").probes() == [1, 2]


@pytest.mark.parametrize("text,fragment", [
    ("normal(0, 1)", "unknown distribution 'normal'"),
    ("choice 1, 2", "cannot read"),
    ("choice([])", "at least one value"),
    ("choice([[1, 2]])", "plain values"),
    ("uniform(1)", "two numbers"),
    ("uniform(a, b)", "two numbers"),
    ("uniform(2, 1)", "lo < hi"),
    ("loguniform(0, 1)", "lo > 0"),
    ("randint(1.5, 3)", "two integers"),
    ("randint(5, 1)", "is empty"),
    ("uniform(0, inf)", "two numbers"),
    ("choice([1, 2)", "cannot read the arguments"),
])
def test_a_malformed_distribution_names_its_key(text, fragment):
    with pytest.raises(SpaceError) as e:
        parse("train.lr", text)
    assert str(e.value).startswith("train.lr: ") and fragment in str(e.value), str(e.value)


def test_a_fixed_value_is_not_a_distribution():
    with pytest.raises(SpaceError, match=r"train.max_steps: 300 is not a distribution.*belongs in the config"):
        parse_space({"train.max_steps": 300})


def test_what_each_search_can_draw_from():
    space = parse_space({"train.lr": "loguniform(1e-4, 1e-2)", "curate.diversity": "grid([1, 2])"})
    check_search(space, "random")  # random: grids crossed, the rest sampled
    with pytest.raises(SpaceError, match="train.lr: tune.search=grid crosses discrete values only"):
        check_search(space, "grid")
    with pytest.raises(SpaceError, match=r"curate.diversity: tune.search=optuna .* choice\(\[1, 2\]\)"):
        check_search(space, "optuna")
    discrete = parse_space({"curate.diversity": "choice([1, 2, 4])", "train.seed": "grid([0, 1])",
                            "train.max_steps": "randint(1, 3)"})
    assert grid_size(discrete, "grid") == 3 * 2 * 3
    assert grid_size(discrete, "random") == 2  # only grid() is crossed by a random search


# --------------------------------------------------------------------------- errors when the config loads


def _load(space: dict, **extra):
    return load_config("quickstart", {"tune.space": space, **extra})


@pytest.mark.parametrize("space,fragment", [
    ({"train.lrr": "choice([1e-3])"}, "tune.space: train.lrr: unknown config key (no 'lrr' in train; known: method"),
    ({"trian.lr": "choice([1e-3])"}, "trian.lr: unknown config key (no 'trian' in the config"),
    ({"train": "choice([1])"}, "train: names a section"),
    ({"train.lr.x": "choice([1])"}, "train.lr.x: train.lr is a value, not a section"),
    ({"train.lr": "loguniform(0, 1)"}, "train.lr: loguniform(0, 1) needs lo > 0"),
    ({"teacher.temperature": "uniform(0, 1)"}, "teacher.temperature: changes the teach stage"),
    ({"data.train_size": "choice([10, 20])"}, "data.train_size: changes the data stage"),
    ({"eval.samples": "choice([1, 3])"}, "eval.samples: changes the eval stage"),
    ({"train.num_workers": "choice([1, 2])"}, "train.num_workers: changes no trial's result"),
    ({"tune.num_samples": "choice([1, 2])"}, "tune.num_samples: changes no trial's result"),
])
def test_a_bad_space_fails_when_the_config_loads_naming_the_key(space, fragment):
    with pytest.raises(ConfigError) as e:
        _load(space)
    assert fragment in str(e.value), str(e.value)


def test_dotted_overrides_of_the_space_are_flattened_back():
    cfg = load_config("quickstart", ["tune.space.train.lr=loguniform(1e-4, 3e-3)",
                                     "tune.space.curate.diversity=choice([1, 2])"])
    assert cfg.tune.space == {"train.lr": "loguniform(1e-4, 3e-3)", "curate.diversity": "choice([1, 2])"}


def test_searchable_keys_are_the_ones_that_change_curate_or_train():
    for key in ("train.lr", "curate.diversity", "student.size", "train.max_steps", "student.lora.r", "curate.dedup"):
        assert TuneConfig.untunable(key) is None, key
    assert TuneConfig.stages_of("student.arch") == {"train", "curate"}
    assert TuneConfig.stages_of("train.lr") == {"train"}


# --------------------------------------------------------------------------- checks before any trial


def test_every_value_is_tried_as_a_config_before_any_trial(tmp_path):
    cfg = _load({"curate.diversity": "choice([1, 2, 8])"}, run_dir=str(tmp_path), **{"teacher.samples": 4})
    with pytest.raises(ConfigError) as e:
        tune_stage.check_space(cfg)
    msg = str(e.value)
    assert "tune.space.curate.diversity=8" in msg and "exceeds teacher.samples=4" in msg, msg
    # a combination of values that only fails together is named too
    cfg = _load({"curate.val_fraction": "choice([0.0, 0.1])", "train.select": "choice([last, val_accuracy])"},
                run_dir=str(tmp_path))
    with pytest.raises(ConfigError) as e:
        tune_stage.check_space(cfg)
    msg = str(e.value)
    assert "tune.space.curate.val_fraction=0.0, tune.space.train.select=val_accuracy" in msg, msg
    assert "needs a validation split" in msg
    assert not any(tmp_path.iterdir())  # nothing was written


def test_search_specific_and_study_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="tune.space.train.lr: tune.search=grid crosses discrete values only"):
        tune_stage.check_space(_load({"train.lr": "uniform(1e-4, 1e-3)"}, **{"tune.search": "grid"}))
    with pytest.raises(ConfigError, match="tune.study_by=train.seed: not a key of tune.space"):
        tune_stage.check_space(_load({"train.lr": "choice([1e-3])"}, **{"tune.study_by": "train.seed"}))
    with pytest.raises(ConfigError, match="tune.space is empty"):
        tune_stage.check_space(load_config("quickstart"))


def _ftcot(*args, cwd):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "ftcot_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_command_refuses_a_bad_space_with_exit_2_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    r = _ftcot("tune", f"run_dir={run_dir}", "tune.space.train.lrr=choice([1e-3])", cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert "tune.space: train.lrr: unknown config key" in r.stderr and "Traceback" not in r.stderr
    r = _ftcot("tune", f"run_dir={run_dir}", "tune.space.curate.diversity=choice([1, 16])", cwd=REPO)
    assert r.returncode == 2 and "tune.space.curate.diversity=16" in r.stderr, r.stderr
    assert not run_dir.exists()  # no Ray started, no stage run, no folder


def test_the_search_folder_is_keyed_by_the_search_not_by_how_it_runs(tmp_path):
    base = _load({"train.lr": "choice([1e-3, 2e-3])"}, run_dir=str(tmp_path))
    same = _load({"train.lr": "choice([1e-3, 2e-3])"}, run_dir=str(tmp_path),
                 **{"tune.max_concurrent_trials": 3, "tune.max_failures": 4, "train.num_workers": 1,
                    "train.batch_size": 32})
    assert tune_stage.search_dir(base) == tune_stage.search_dir(same)
    others = [_load(base.tune.space, run_dir=str(tmp_path), **change)
              for change in ({"tune.seed": 1}, {"train.max_steps": 7}, {"tune.scheduler": "asha"})]
    others.append(_load({"train.lr": "choice([1e-3])"}, run_dir=str(tmp_path)))
    assert len({tune_stage.search_dir(c) for c in [base, *others]}) == 5


def test_curate_runs_once_per_distinct_D_the_space_can_draw():
    cfg = _load({"curate.diversity": "grid([1, 2, 4])", "train.lr": "loguniform(1e-4, 1e-3)"})
    space = tune_stage.check_space(cfg)
    assert [c.curate.diversity for c in tune_stage.curate_variants(cfg, space)] == [1, 2, 4]
    only_train = _load({"train.lr": "choice([1e-4, 1e-3])"})
    assert len(tune_stage.curate_variants(only_train, tune_stage.check_space(only_train))) == 1


# --------------------------------------------------------------------------- Tune's distributions


def test_our_distributions_become_tunes():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    from ftcot_ray.tune.search import param_space

    space = parse_space({"a.x": "choice([1, 2])", "a.g": "grid([3, 4])", "a.u": "uniform(0, 1)",
                         "a.l": "loguniform(1e-4, 1e-2)", "a.r": "randint(1, 3)"})
    p = param_space(space, "random")
    assert isinstance(p["a.x"], Categorical) and p["a.x"].categories == [1, 2]
    assert p["a.g"] == tune.grid_search([3, 4])
    assert isinstance(p["a.u"], Float) and isinstance(p["a.l"], Float)
    assert isinstance(p["a.r"], Integer) and (p["a.r"].lower, p["a.r"].upper) == (1, 4)  # Tune's upper is exclusive
    draws = {p["a.r"].sample() for _ in range(200)}
    assert draws == {1, 2, 3}
    grid = param_space(parse_space({"a.x": "choice([1, 2])", "a.r": "randint(1, 2)"}), "grid")
    assert grid == {"a.x": tune.grid_search([1, 2]), "a.r": tune.grid_search([1, 2])}


# --------------------------------------------------------------------------- results, pure


def _row(tid, acc, loss, status="finished", **kw):
    return {"trial_id": tid, "val_accuracy": acc, "val_loss": loss, "status": status, **kw}


def test_best_is_the_highest_val_accuracy_of_a_finished_trial_ties_to_lower_loss():
    rows = [_row("a", 0.5, 1.0), _row("b", 0.75, 0.9), _row("c", 0.75, 0.8), _row("d", 0.9, 0.1, "stopped early (asha)"),
            _row("e", None, None, "failed")]
    assert results.best(rows, "val_accuracy")["trial_id"] == "c"
    assert results.best(rows, "val_loss")["trial_id"] == "c"
    assert results.best([_row("x", None, None, "failed")], "val_accuracy") is None


def test_study_table_is_mean_and_sample_std_per_value(tmp_path):
    rows = [_row(f"t{i}", 0.5, 1.0, **{"curate.diversity": d, "test_accuracy": a})
            for i, (d, a) in enumerate([(1, 0.5), (1, 0.7), (1, 0.6), (4, 0.9), (4, 0.8)])]
    rows.append(_row("t9", 0.1, 1.0, "stopped early (asha)", **{"curate.diversity": 4, "test_accuracy": 0.0}))
    table = results.study_table(rows, "curate.diversity")
    assert [t["curate.diversity"] for t in table] == [1, 4]
    assert table[0]["n"] == 3 and table[0]["mean_test_accuracy"] == pytest.approx(0.6)
    assert table[0]["std_test_accuracy"] == pytest.approx(0.1)
    assert table[1]["n"] == 2 and table[1]["mean_test_accuracy"] == pytest.approx(0.85)
    files = results.write_study(tmp_path, table, "curate.diversity", "t")
    assert [f.name for f in files] == ["study.csv", "study.md", "study.png"]
    assert "| 1 | 3 | 60.0 ± 10.0 | 50.0, 70.0, 60.0 |" in (tmp_path / "study.md").read_text()
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_tables_and_plots_are_written(tmp_path):
    rows = [_row("a", 0.5, 1.0, D=1, lr=1e-3, **{"curate.diversity": 1, "train.lr": 1e-3, "steps": 8, "wall_s": 3.0,
                                                  "attempts": 1, "selected_step": 8, "config": "x/config.yaml"}),
            _row("b", 0.75, 0.9, D=2, lr=2e-3, **{"curate.diversity": 2, "train.lr": 2e-3, "steps": 8, "wall_s": 3.5,
                                                   "attempts": 2, "selected_step": 4, "config": "y/config.yaml"})]
    files = results.write_tables(tmp_path, rows, ["curate.diversity", "train.lr"]) + results.plot(tmp_path, rows)
    assert [f.name for f in files] == ["trials.csv", "trials.md", "val_accuracy_vs_D.png", "val_accuracy_vs_lr.png"]
    md = (tmp_path / "trials.md").read_text().splitlines()
    assert md[0] == ("| trial_id | curate.diversity | train.lr | D | lr | status | val_accuracy | val_loss | "
                     "selected_step | steps | wall_s | attempts |")
    assert md[3].startswith("| b | 2 | 0.002 | 2 | 0.002 | finished | 0.75 | 0.9 | 4 | 8 | 3.5 | 2 |")
    assert "config" in (tmp_path / "trials.csv").read_text().splitlines()[0]


def test_registry_names_resolve_to_the_entry_folder(tmp_path):
    assert registry.resolve("/some/student", tmp_path) == Path("/some/student")
    with pytest.raises(Exception, match="no registry entry"):
        registry.resolve("registry:coin_flip_synth", tmp_path)
    entry = registry.entry_dir(tmp_path, "coin_flip_synth")
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text("{}")
    assert registry.resolve("registry:coin_flip_synth", tmp_path) == tmp_path / "best" / "coin_flip_synth"


def test_the_diversity_study_preset_is_a_grid_of_4_D_by_3_seeds():
    cfg = load_config("study/diversity")
    space = tune_stage.check_space(cfg)
    assert grid_size(space, cfg.tune.search) * cfg.tune.samples() == 12
    assert cfg.tune.study_by == "curate.diversity" and cfg.teacher.samples == 8
    assert [c.curate.diversity for c in tune_stage.curate_variants(cfg, space)] == [1, 2, 4, 8]
