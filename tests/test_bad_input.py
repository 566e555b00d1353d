"""Input a careless user gives (issue 9, points 5 and 8): refused early, with the key, file or line
named, and nothing already done lost. No Ray here: these all fail before any work starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftcot_ray.artifacts import finish, is_complete, require, stage_dir, verify
from ftcot_ray.config import load_config
from ftcot_ray.errors import ConfigError, InputFileError, StageInputMissing
from ftcot_ray.io import write_jsonl
from ftcot_ray.preflight import preflight
from ftcot_ray.stages import data as data_stage
from ftcot_ray.tables import read_table

REPO = Path(__file__).resolve().parents[1]


def ftcot(*args, cwd=REPO, env_extra=None):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "ftcot_ray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


# --------------------------------------------------------------------------- combinations (point 5)


@pytest.mark.parametrize("overrides, names", [
    ({"eval.samples": 4}, ["eval.samples=4", "eval.temperature"]),
    ({"train.offload": True, "train.zero_stage": 0}, ["train.offload", "train.zero_stage"]),
    ({"train.max_steps": -5}, ["train.max_steps"]),
    ({"data.train_size": -1}, ["data.train_size"]),
    ({"train.batch_size": 7}, ["train.batch_size=7", "train.num_workers=2"]),
    ({"curate.val_fraction": 0.0}, ["train.select=val_accuracy", "curate.val_fraction"]),
    ({"train.precision": "fp16"}, ["train.precision=fp16", "train.use_gpu"]),
    ({"pipeline.diversity": [1, 8]}, ["pipeline.diversity [8]", "teacher.samples=4"]),
])
def test_impossible_combinations_fail_when_the_config_loads(overrides, names):
    with pytest.raises(ConfigError) as e:
        load_config("quickstart", overrides)
    for name in names:
        assert name in str(e.value)


def test_the_cli_refuses_them_before_writing_anything(tmp_path):
    r = ftcot("run", f"run_dir={tmp_path}", "eval.samples=4", "--plan")
    assert r.returncode == 2 and "eval.temperature" in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())


def test_aqua_without_its_train_file_is_not_reported_ready(shared_datasets, tmp_path):
    cfg = load_config("paper/aqua-gpt2-large", [f"run_dir={tmp_path}",
                                               f"data.source={shared_datasets / 'zero_shot_cot/dataset'}"])
    checks = {next(k for k in c if k != "ok"): c for c in preflight(cfg)}
    assert not checks["data"]["ok"] and "no train split" in checks["data"]["data"]


# --------------------------------------------------------------------------- configs and secrets


def test_a_yaml_whose_base_names_itself_is_a_clear_error(tmp_path):
    f = tmp_path / "loop.yaml"
    f.write_text(f"base: {f}\ntrain: {{lr: 0.1}}\n")
    with pytest.raises(ConfigError, match="`base:` makes a cycle"):
        load_config(str(f))


def test_a_key_pasted_into_api_key_env_is_refused_and_never_echoed():
    key = "sk-proj-AbCdEf0123456789GhIjKlMnOpQrStUv"
    r = ftcot("run", f"teacher.api_key_env={key}", "--plan")
    assert r.returncode == 2 and "NAME of an environment variable" in r.stderr
    assert key not in r.stderr and key not in r.stdout and "AbCdEf" not in r.stderr


def test_env_name_must_look_like_one():
    with pytest.raises(ConfigError, match="teacher.api_key_env must be the name of an environment variable"):
        load_config("quickstart", {"teacher.api_key_env": "my key"})


# --------------------------------------------------------------------------- data files (point 8)


def test_an_edited_data_file_is_read_again(tmp_path):
    src = tmp_path / "mine.jsonl"
    write_jsonl(src, [{"question": f"q{i}?", "answer": str(i)} for i in range(10)])
    cfg = load_config("quickstart", {"run_dir": str(tmp_path / "run"), "data.dataset": "mine", "data.source": str(src),
                                     "data.answer_format": "number_exact"})
    first = data_stage.run(cfg)
    write_jsonl(src, [{"question": f"q{i}?", "answer": str(i + 1)} for i in range(10)])  # same path, new answers
    second = data_stage.run(cfg)
    assert not second.get("reused") and second["out"] != first["out"]


def test_duplicates_are_merged_or_dropped_before_the_split(ray_session, tmp_path):
    src = tmp_path / "mine.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(20)]
    rows += [{"question": "What is 3 + 3?", "answer": "6"}] * 3  # the same question again, same answer
    rows += [{"question": "What is 99 + 1?", "answer": "100"}, {"question": "what is 99 + 1?", "answer": "101"}]
    write_jsonl(src, rows)
    cfg = load_config("quickstart", {"run_dir": str(tmp_path / "run"), "data.dataset": "mine", "data.source": str(src),
                                     "data.answer_format": "number_exact"})
    summary = data_stage.run(cfg, tmp_path / "o")
    questions = [r["question"].lower() for r in read_table(tmp_path / "o", "problems")]
    assert len(questions) == len(set(questions)) == 20  # 3 merged into the first "3 + 3", both "99 + 1" dropped
    assert any("3 repeated questions merged" in n and "2 records dropped" in n for n in summary["notes"])


def test_a_file_that_is_not_utf8_names_its_line(ray_session, tmp_path):
    src = tmp_path / "mine.jsonl"
    src.write_bytes(b'{"question": "ok?", "answer": "1"}\n{"question": "caf\xe9?", "answer": "2"}\n')
    cfg = load_config("quickstart", {"data.dataset": "mine", "data.source": str(src), "data.answer_format": "number_exact"})
    with pytest.raises(InputFileError, match=r"mine.jsonl:2: not UTF-8"):
        data_stage.run(cfg, tmp_path / "o")


def test_the_raw_file_of_another_benchmark_names_the_file(shared_datasets, tmp_path):
    addsub = shared_datasets / "zero_shot_cot/dataset/AddSub/AddSub.json"  # the reported case: a bare int() error
    r = ftcot("data", "--dataset", "multiarith", "--source", str(addsub), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and str(addsub) in r.stderr and "multiarith" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- what manifests vouch for


def test_a_truncated_table_is_no_longer_done_and_its_reader_says_so(tmp_path):
    cfg = load_config("quickstart", {"run_dir": str(tmp_path)})
    out = stage_dir(cfg, "teach")
    write_jsonl(out / "completions.jsonl", [{"sample_index": i} for i in range(30)])
    finish(out, cfg, "teach")
    assert is_complete(out)
    lines = (out / "completions.jsonl").read_text().splitlines(keepends=True)
    (out / "completions.jsonl").write_text("".join(lines[:10]))  # cut at a line boundary, manifest intact
    assert not is_complete(out) and "completions.jsonl" in verify(out)
    with pytest.raises(StageInputMissing, match="completions.jsonl has .* bytes, its manifest vouches for"):
        require(out, "teach")


def test_a_student_folder_missing_its_weights_is_not_done_in_the_plan(tmp_path):
    cfg = load_config("quickstart", {"run_dir": str(tmp_path)})
    out = stage_dir(cfg, "train")
    (out / "student").mkdir(parents=True)
    (out / "student" / "config.json").write_text("{}")
    (out / "student" / "model.safetensors").write_bytes(b"0" * 100)
    finish(out, cfg, "train")
    (out / "student" / "model.safetensors").unlink()
    r = ftcot("run", f"run_dir={tmp_path}", "--plan")
    stages = {s["dir"]: s["done"] for s in json.loads(r.stdout)["stages"]}
    assert stages[str(out)] is False
    assert "model.safetensors, which its manifest vouches for, is missing" in verify(out)


def test_an_unwritable_run_dir_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = ftcot("run", f"run_dir={blocker}/run")
    assert r.returncode == 2 and "run_dir" in r.stderr and "not writable" in r.stderr and "Traceback" not in r.stderr
