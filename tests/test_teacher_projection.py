"""The cost projection against what a real run then sends and reports (teacher-sim over HTTP, real Ray)."""

from __future__ import annotations

import json

import pytest

from ftcot_ray import cli
from ftcot_ray.config import TeacherSimConfig, dump_config, load_config
from ftcot_ray.stages import teach
from ftcot_ray.teacher.projection import token_counter
from ftcot_ray.teacher.sim import running_sim

from helpers_teacher import add_problems, make_cfg, register_add_task, sim_stats, write_data_stage

PRICES = {"teacher.prices": {"ftcot-sim-teacher": {"input": 3.0, "output": 15.0}}}


@pytest.fixture(autouse=True)
def _task():
    register_add_task()


def within(value: float, r: dict) -> bool:
    return r["low"] - 1e-9 <= value <= r["high"] + 1e-9


def check(projected: dict, actual: dict) -> None:
    """Requests and step-1 prompt tokens exactly; the rest within the stated ranges."""
    assert projected["requests"] == actual["requests"]
    p, a = projected["prompt_tokens"], actual["prompt_tokens"]
    assert p["step1"]["low"] == p["step1"]["high"] == a["step1"]
    assert within(a["step2"], p["step2"]) and within(a["total"], p["total"])
    for step in ("step1", "step2", "total"):
        assert within(actual["completion_tokens"][step], projected["completion_tokens"][step])
    assert within(actual["usd"], projected["usd"])


@pytest.mark.parametrize("use_n", [False, True])
def test_projection_equals_what_the_run_sends(ray_session, tmp_path, use_n):
    with running_sim(TeacherSimConfig(error_rate=0.2)) as url:
        cfg = make_cfg(tmp_path, url, **PRICES, **{"teacher.samples": 3, "teacher.use_n": use_n})
        write_data_stage(cfg, add_problems(8))
        plan = teach.project(cfg)  # what `ftcot teach --dry-run` prints: no request sent
        assert sim_stats(url)["total_requests"] == 0
        summary = teach.run(cfg, progress=False)
    d_max = plan["by_D"][-1]
    assert d_max["D"] == 3 and plan["prompt_tokens_exact"] and d_max["requests"]["step1"] == (8 if use_n else 24)
    check(d_max, summary["actual"])
    assert summary["projected"]["requests"] == summary["actual"]["requests"]
    assert summary["actual"]["usd"] == pytest.approx(summary["cost_usd"])
    by_d = {d["D"]: d for d in plan["by_D"]}
    assert set(by_d) == {1, 3} and by_d[1]["requests"]["step2"] == 8  # pipeline.diversity [1, ...] capped at D_max


def test_cached_answers_are_free_and_a_pilot_projects_the_rest(ray_session, tmp_path):
    with running_sim(TeacherSimConfig(error_rate=0.2)) as url:
        cfg = make_cfg(tmp_path, url, **PRICES, **{"teacher.samples": 2, "teacher.pilot": 3})
        write_data_stage(cfg, add_problems(12))
        plan = teach.project(cfg)
        pilot = plan["pilot"]
        s = sim_stats(url)
        assert pilot["questions"] == 3 and pilot["rows"] == 6 and s["answered"] == 12  # 3 questions x 2 samples x 2 steps
        d_max = plan["by_D"][-1]
        assert d_max["cached_rows"] == 6 and d_max["requests"] == {"step1": 18, "step2": 18, "total": 36}
        assert d_max["completion_tokens"]["total"].get("expected") is not None  # from the pilot's answers
        summary = teach.run(cfg, progress=False)
        assert sim_stats(url)["max_answers_per_prompt_sample"] == 1  # the pilot's answers were not asked again
    check(d_max, summary["actual"])
    band = d_max["completion_tokens"]["total"]["band"]
    assert band[0] <= summary["actual"]["completion_tokens"]["total"] <= band[1]
    assert summary["cache_hits"] == 12  # both steps of the pilot's 6 rows came from the store


def test_dry_run_and_run_plan_print_it_and_send_nothing(tmp_path, capsys):
    cfg = load_config("quickstart", {"run_dir": str(tmp_path / "qs"), "data.train_size": 20, "data.test_size": 5,
                                     **PRICES})
    path = tmp_path / "qs.yaml"
    dump_config(cfg, path)
    assert cli.main(["teach", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr()
    plan = json.loads(out.out.strip().splitlines()[-1])["projection"]
    assert "teacher projection" in out.err and "D=4" in out.err
    d = {x["D"]: x for x in plan["by_D"]}
    assert set(d) == {1, 4} and d[4]["requests"]["step1"] == 100 and d[1]["requests"]["step1"] == 25
    assert d[4]["usd"]["high"] > d[1]["usd"]["high"] > 0 and not (tmp_path / "qs" / "teach").exists()
    assert cli.main(["run", "--config", str(path), "--plan"]) == 0
    ran = json.loads(capsys.readouterr().out)
    assert ran["teacher"]["by_D"] == plan["by_D"]
    batch = load_config(str(path), {"teacher.mode": "batch"})
    assert teach.project(batch)["by_D"][-1]["usd"]["high"] == pytest.approx(d[4]["usd"]["high"] / 2)


def test_token_counts_exact_with_a_local_tokenizer_else_an_estimate_that_says_so(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["Q: What is 3 plus 4?\nA: Let's think step by step."] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    base = {"teacher.base_url": "https://api.example.com/v1", "teacher.model": "big-model"}
    exact = token_counter(load_config(None, base | {"teacher.tokenizer": str(tmp_path)}).teacher)
    text = "Q: What is 3 plus 4?\nA: Let's think step by step."
    assert exact.exact and exact.count(text) == len(tok.encode(text, add_special_tokens=False).ids)
    guess = token_counter(load_config(None, base).teacher)
    assert not guess.exact and "estimate" in guess.label and guess.count("abcdefgh") == 2
    assert token_counter(load_config(None, {}).teacher).exact  # the sim: its own count
