"""The data stage through the real CLI (`python -m ftcot_ray data ...`) and through `run(cfg)`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftcot_ray.artifacts import is_complete, read_manifest
from ftcot_ray.config import load_config
from ftcot_ray.io import InputFileError, read_jsonl
from ftcot_ray.stages import data as data_stage
from ftcot_ray.tables import read_table
from ftcot_ray.tasks.custom import resolve_task

REPO = Path(__file__).resolve().parents[1]
PROBLEM_COLUMNS = {"sample_index", "question", "answer", "split", "dataset"}


def ftcot_data(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ftcot_ray", "data", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- real benchmark via CLI


def test_cli_multiarith_outputs_manifest_last_and_reuse(shared_datasets, tmp_path):
    out = tmp_path / "data"
    source = str(shared_datasets / "zero_shot_cot" / "dataset")
    first = summary_of(ftcot_data("--dataset", "multiarith", "--source", source, "--out", str(out), cwd=tmp_path))
    assert first["counts"] == {"train": 420, "test": 180} and first["dataset"] == "multiarith"

    names = {p.name for p in out.iterdir()}
    assert names == {"problems.jsonl", "split.json", "config.yaml", "manifest.json"}
    manifest_time = (out / "manifest.json").stat().st_mtime_ns
    assert all(manifest_time >= (out / n).stat().st_mtime_ns for n in names)

    rows = read_jsonl(out / "problems.jsonl")
    ref = json.loads((shared_datasets / "reasoning-teacher/data/split/multiarith__default.json").read_text())
    assert json.loads((out / "split.json").read_text()) == ref
    assert [r["sample_index"] for r in rows] == list(range(600))
    assert all(set(r) == PROBLEM_COLUMNS for r in rows)
    assert [r["sample_index"] for r in rows if r["split"] == "train"] == ref["train"]
    assert rows[0]["answer"] == "39" and rows[0]["dataset"] == "multiarith"
    assert load_config(str(out / "config.yaml")).data.dataset == "multiarith"

    before = (out / "problems.jsonl").stat().st_mtime_ns
    again = summary_of(ftcot_data("--dataset", "multiarith", "--source", source, "--out", str(out), cwd=tmp_path))
    assert again.pop("reused") is True
    assert again == first
    assert (out / "problems.jsonl").stat().st_mtime_ns == before  # no work redone


def test_aqua_is_test_only_and_says_so(shared_datasets, tmp_path):
    cfg = load_config(None, {"data.dataset": "aqua", "data.source": str(shared_datasets / "zero_shot_cot/dataset")})
    summary = data_stage.run(cfg, tmp_path / "aqua")
    assert summary["counts"] == {"train": 0, "test": 254}
    assert any("test split only" in n for n in summary["notes"])
    rows = read_jsonl(tmp_path / "aqua" / "problems.jsonl")
    assert rows[0]["sample_index"] == 97467 and {r["split"] for r in rows} == {"test"}


def test_default_output_folder_is_the_stage_dir(shared_datasets, tmp_path):
    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "data.dataset": "coin_flip",
                             "data.source": str(shared_datasets / "zero_shot_cot/dataset")})
    summary = data_stage.run(cfg)
    out = Path(summary["out"])
    assert out.parent == tmp_path / "run" / "data" and is_complete(out)
    assert read_manifest(out)["tables"]["problems"]["columns"] == ["sample_index", "question", "answer", "split", "dataset"]


# --------------------------------------------------------------------------- errors


def test_cli_malformed_jsonl_exits_2_with_file_and_line(tmp_path):
    src = write_lines(tmp_path / "mine.jsonl", [{"question": "1+1?", "answer": "2"}, "", "{oops"])
    out = tmp_path / "out"
    proc = ftcot_data("--dataset", "custom", "--source", str(src), "--out", str(out), "data.answer_format=number_exact",
                      cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{src}:3: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # checked before anything is written


def test_cli_unknown_dataset_exits_2(tmp_path):
    proc = ftcot_data("--dataset", "no_such_task", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 2 and "unknown dataset 'no_such_task'" in proc.stderr


def test_custom_without_answer_format_is_a_clear_error(ray_session, tmp_path):
    src = write_lines(tmp_path / "mine.jsonl", [{"question": "q", "answer": "2"}])
    cfg = load_config(None, {"data.dataset": "custom", "data.source": str(src)})
    with pytest.raises(ValueError, match="data.answer_format"):
        data_stage.run(cfg, tmp_path / "o")


@pytest.mark.parametrize(
    "row, fmt, message",
    [
        ({"question": "q", "answer": "two"}, "number_exact", "is not a number"),
        ({"question": "q", "answer": "maybe"}, "yesno", "is not yes/no"),
        ({"question": "q", "answer": "F"}, "choice", "is not one of the letters"),
        ({"question": "", "answer": "1"}, "number_exact", "missing or empty 'question'"),
        ({"question": "q"}, "number_exact", "missing or empty 'answer'"),
        ({"question": "q", "answer": "1", "split": "dev"}, "number_exact", "split must be 'train' or 'test'"),
    ],
)
def test_custom_bad_record_names_the_line(ray_session, tmp_path, row, fmt, message):
    src = write_lines(tmp_path / "mine.jsonl", [{"question": "ok", "answer": "yes" if fmt == "yesno" else "A" if fmt == "choice" else "1"}, row])
    cfg = load_config(None, {"data.dataset": "custom", "data.source": str(src), "data.answer_format": fmt})
    with pytest.raises(InputFileError, match=f"mine.jsonl:2: .*{message}"):
        data_stage.run(cfg, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_custom_split_on_some_rows_only_is_refused(ray_session, tmp_path):
    src = write_lines(tmp_path / "mine.jsonl", [{"question": "a", "answer": "1", "split": "train"}, {"question": "b", "answer": "2"}])
    cfg = load_config(None, {"data.dataset": "custom", "data.source": str(src), "data.answer_format": "number_exact"})
    with pytest.raises(InputFileError, match="1 of 2 records have a 'split'"):
        data_stage.run(cfg, tmp_path / "o")


# --------------------------------------------------------------------------- your own data


def test_custom_jsonl_gets_the_paper_split(ray_session, tmp_path):
    src = write_lines(tmp_path / "arith.jsonl", [{"question": f"{i} + 1?", "answer": i + 1} for i in range(20)])
    cfg = load_config(None, {"data.dataset": "my_arith", "data.source": str(src), "data.answer_format": "number_exact"})
    summary = data_stage.run(cfg, tmp_path / "o")
    assert summary["counts"] == {"train": 14, "test": 6}
    rows = read_table(tmp_path / "o", "problems")
    assert rows[3] == {"sample_index": 3, "question": "3 + 1?", "answer": "4", "split": rows[3]["split"], "dataset": "my_arith"}
    from ftcot_ray.tasks.splits import paper_split

    assert json.loads((tmp_path / "o" / "split.json").read_text()) == paper_split(20)
    # Other stages grade the same task from the config alone.
    task = resolve_task(cfg.data)
    assert task.kind == "number_exact" and task.is_correct(task.extract_answer("so --> 4", "-->"), rows[3]["answer"])


def test_custom_csv_with_split_column(ray_session, tmp_path):
    src = tmp_path / "quiz.csv"
    src.write_text('question,answer,split\n"Is it, really?",Yes,train\nSky green?,no,test\nA or B?,yes,train\n')
    cfg = load_config(None, {"data.dataset": "custom", "data.source": str(src), "data.answer_format": "yesno"})
    summary = data_stage.run(cfg, tmp_path / "o")
    assert summary["counts"] == {"train": 2, "test": 1}
    rows = read_table(tmp_path / "o", "problems")
    assert [(r["question"], r["split"]) for r in rows] == [("Is it, really?", "train"), ("Sky green?", "test"), ("A or B?", "train")]
    assert resolve_task(cfg.data).is_correct("yes", rows[0]["answer"])


def test_custom_csv_bad_row_names_the_line(ray_session, tmp_path):
    src = tmp_path / "quiz.csv"
    src.write_text("question,answer\nq1,1\nq2,\n")
    cfg = load_config(None, {"data.dataset": "custom", "data.source": str(src), "data.answer_format": "number_float"})
    with pytest.raises(InputFileError, match=r"quiz.csv:3: missing or empty 'answer'"):
        data_stage.run(cfg, tmp_path / "o")


def test_partial_output_is_redone(ray_session, tmp_path):
    src = write_lines(tmp_path / "arith.jsonl", [{"question": f"{i}?", "answer": i} for i in range(10)])
    cfg = load_config(None, {"data.dataset": "custom", "data.source": str(src), "data.answer_format": "number_exact"})
    out = tmp_path / "o"
    out.mkdir()
    (out / "problems.jsonl").write_text("half a row")  # a killed earlier attempt, no manifest
    summary = data_stage.run(cfg, out)
    assert "reused" not in summary and len(read_table(out, "problems")) == 10
    assert not (out / "problems.jsonl").exists()  # the killed attempt's leftover is cleared


# --------------------------------------------------------------------------- synthetic tasks


def test_synthetic_task_uses_its_own_generator_and_split(tmp_path):
    cfg = load_config(None, {"data.dataset": "coin_flip_synth", "data.train_size": 30, "data.test_size": 10})
    task = resolve_task(cfg.data)
    assert task.synthetic
    summary = data_stage.run(cfg, tmp_path / "o")
    assert summary["counts"] == {"train": 30, "test": 10}
    rows = read_jsonl(tmp_path / "o" / "problems.jsonl")
    assert {r["dataset"] for r in rows} == {"coin_flip_synth"}
    assert {r["answer"] for r in rows} <= {"yes", "no"}
