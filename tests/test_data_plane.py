"""The data plane on Ray Data, for real: a local Ray, the teacher-sim over HTTP, moto's S3 on 127.0.0.1.

* every input form (JSONL, CSV, JSON, Parquet, folders of shards, a `datasets` save_to_disk folder,
  local or in a bucket) gives the same problems;
* the Ray Data fan-out writes exactly what asking the teacher directly (no Ray) gives;
* raising D_max, or adding questions, asks only what is missing; an old per-answer cache is migrated
  and nothing it holds is asked again;
* with two workers and `teacher.rpm`, no window sees more than the limit, and a 429 on one worker
  pauses the other.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BUCKET
from ftcot_ray.artifacts import MANIFEST, stage_dir
from ftcot_ray.config import TeacherSimConfig, load_config
from ftcot_ray.stages import data as data_stage
from ftcot_ray.stages import teach
from ftcot_ray.tables import read_table
from ftcot_ray.teacher.answers import AnswerStore
from ftcot_ray.teacher.sim import running_sim

from helpers_teacher import add_problems, make_cfg, register_add_task, sim_stats, write_data_stage

REPO = Path(__file__).resolve().parents[1]
KEEP = ("sample_index", "question", "answer", "split", "dataset")


@pytest.fixture(autouse=True)
def _task():
    register_add_task()


# --------------------------------------------------------------------------- inputs


def qa_records() -> list[dict]:
    """40 questions, one repeated (same answer: merged) and one given two answers (dropped)."""
    rows = [{"question": f"What is {i} plus {i + 1}?", "answer": 2 * i + 1} for i in range(40)]
    return rows[:10] + [{"question": "what is 3  plus 4?", "answer": 7}] + rows[10:] + \
        [{"question": "What is 5 plus 6?", "answer": 12}]


def problems_of(tmp_path: Path, source: str, name: str) -> list[dict]:
    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "data.dataset": "qa", "data.source": source,
                             "data.answer_format": "number_exact"})
    summary = data_stage.run(cfg, tmp_path / "out" / name)
    assert summary["records"] == 42 and summary["n"] == 39, summary  # 1 repeat merged, 2 conflicting dropped
    return [{k: r[k] for k in KEEP} for r in read_table(tmp_path / "out" / name, "problems")]


def data_cli(tmp_path: Path, source: str, name: str, fmt: str = "number_exact") -> subprocess.CompletedProcess:
    """`ftcot data` in its own process (its own Ray, started with this environment: the bucket's AWS_*)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([sys.executable, "-m", "ftcot_ray", "data", "--dataset", "qa", "--source", source, "--out",
                           str(tmp_path / "out" / name), f"run_dir={tmp_path / 'run'}", f"data.answer_format={fmt}",
                           "resources.num_cpus=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def problems_from_cli(tmp_path: Path, source: str, name: str) -> list[dict]:
    proc = data_cli(tmp_path, source, name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [{k: r[k] for k in KEEP} for r in read_table(tmp_path / "out" / name, "problems")]


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def upload(s3, folder: Path, prefix: str) -> str:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(folder).as_posix()}")
    return f"s3://{BUCKET}/{prefix}"


def test_every_input_form_gives_the_same_problems(ray_session, tmp_path, s3):
    import csv

    import datasets

    rows = qa_records()
    src = tmp_path / "src"
    src.mkdir()
    (src / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(src / "qa.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["question", "answer"])
        w.writeheader()
        w.writerows(rows)
    (src / "qa.json").write_text(json.dumps({"data": rows}))
    write_parquet(src / "qa.parquet", rows)
    for i, part in enumerate((rows[:15], rows[15:30], rows[30:])):  # shards, named in file order
        (src / "jsonl_shards" / f"part-{i:03d}.jsonl").parent.mkdir(exist_ok=True)
        (src / "jsonl_shards" / f"part-{i:03d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        write_parquet(src / "parquet_shards" / "nested" / f"part-{i:03d}.parquet", part)
    datasets.Dataset.from_list([r | {"answer": str(r["answer"])} for r in rows]).save_to_disk(str(src / "hf"))

    ref = problems_of(tmp_path, str(src / "qa.jsonl"), "jsonl")
    assert [p["sample_index"] for p in ref] == list(range(39)) and {p["split"] for p in ref} == {"train", "test"}
    forms = {"csv": src / "qa.csv", "json": src / "qa.json", "parquet": src / "qa.parquet",
             "jsonl_shards": src / "jsonl_shards", "parquet_shards": src / "parquet_shards", "datasets": src / "hf"}
    for name, path in forms.items():
        assert problems_of(tmp_path, str(path), name) == ref, name
    # In a bucket (moto's S3 on 127.0.0.1), read by a command started with the bucket's credentials.
    assert problems_from_cli(tmp_path, upload(s3, src / "parquet_shards", "qa/parquet"), "s3_parquet") == ref
    s3.upload_file(str(src / "qa.jsonl"), BUCKET, "qa/one.jsonl")
    assert problems_from_cli(tmp_path, f"s3://{BUCKET}/qa/one.jsonl", "s3_jsonl") == ref


def test_a_datasets_dict_gives_its_splits_and_a_bad_record_names_its_place(ray_session, tmp_path, s3):
    import datasets

    from ftcot_ray.errors import InputFileError

    rows = [{"question": f"Is {i} even?", "answer": "yes" if i % 2 == 0 else "no"} for i in range(12)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]),
                          "test": datasets.Dataset.from_list(rows[8:])}).save_to_disk(str(tmp_path / "dd"))
    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "data.dataset": "even", "data.source": str(tmp_path / "dd"),
                             "data.answer_format": "yesno"})
    summary = data_stage.run(cfg, tmp_path / "o")
    assert summary["counts"] == {"train": 8, "test": 4}
    problems = read_table(tmp_path / "o", "problems")
    assert [p["question"] for p in problems if p["split"] == "test"] == [r["question"] for r in rows[8:]]

    bad = tmp_path / "bad"
    write_parquet(bad / "a.parquet", rows[:5])
    write_parquet(bad / "b.parquet", rows[5:7] + [{"question": "Is 7 odd?", "answer": "perhaps"}])
    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "data.dataset": "even", "data.source": str(bad),
                             "data.answer_format": "yesno"})
    with pytest.raises(InputFileError, match=r"bad/b.parquet: row 2: answer 'perhaps' is not yes/no"):
        data_stage.run(cfg, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()  # checked before anything is written
    uri = upload(s3, bad, "bad")
    proc = data_cli(tmp_path, uri, "o3", fmt="yesno")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{uri}/b.parquet: row 2: answer 'perhaps' is not yes/no" in proc.stderr


# --------------------------------------------------------------------------- the fan-out


def test_the_pipeline_writes_what_asking_the_teacher_directly_gives(ray_session, tmp_path):
    """The quickstart's teacher (the simulated coin flips, D=4 at 0.7), asked through the Ray Data fan-out,
    and asked directly by one client on this process with nothing in between: the same table."""
    from ftcot_ray.endpoint import Secret
    from ftcot_ray.teacher.client import TeacherClient
    from ftcot_ray.teacher.fanout import answer_questions
    from ftcot_ray.teacher.limiter import JobGate, Permits

    cfg = load_config("quickstart", {"run_dir": str(tmp_path / "qs"), "data.train_size": 40, "data.test_size": 20,
                                     "resources.num_cpus": 4, "teacher.batch_size": 8})
    data_stage.run(cfg)
    summary = teach.run(cfg, progress=False)
    table = read_table(stage_dir(cfg, "teach"), "completions")
    problems = [{k: p[k] for k in ("sample_index", "split", "question", "answer")}
                for p in read_table(stage_dir(cfg, "data"), "problems")]
    with running_sim(cfg.teacher.sim) as url:
        async def direct() -> list[dict]:
            client = TeacherClient(cfg.teacher, base_url=url, endpoint_id=teach.endpoint_id(cfg), secret=Secret("x"),
                                   permits=Permits(JobGate(), False, 0.0, local=True))
            try:
                return await answer_questions(client, cfg.teacher, problems)
            finally:
                await client.close()

        reference = sorted(asyncio.run(direct()), key=lambda r: (r["sample_index"], r["sample_idx"]))
    assert summary["rows"] == len(table) == len(reference) == 240 and summary["errors"] == 0
    assert table == reference
    shards = list((stage_dir(cfg, "teach") / "completions").glob("*.parquet"))
    assert shards and len(AnswerStore(teach.cache_dir(cfg)).block_names()) <= 480 // 200 + 2  # answers in blocks


def test_raising_d_max_or_adding_questions_asks_only_what_is_missing(ray_session, tmp_path):
    with running_sim(TeacherSimConfig(error_rate=0.0)) as url:
        cfg = make_cfg(tmp_path, url, **{"teacher.samples": 2})
        problems = add_problems(10)
        write_data_stage(cfg, problems)
        teach.run(cfg, progress=False)
        first = set(sim_stats(url, full=True)["answers"])
        more = make_cfg(tmp_path, url, **{"teacher.samples": 4, "pipeline.diversity": [1, 4]})
        write_data_stage(more, problems)
        summary = teach.run(more, progress=False)
        second = set(sim_stats(url, full=True)["answers"]) - first
        assert summary["rows"] == 40 and summary["cache_hits"] == 40  # samples 0, 1: both steps stored
        assert sorted({int(k.rsplit("#", 1)[1]) for k in second}) == [2, 3] and len(second) == 40
        assert sim_stats(url)["max_answers_per_prompt_sample"] == 1

        grown = add_problems(12)  # two questions more (the first ten as before)
        write_data_stage(more, grown)
        (stage_dir(more, "teach") / MANIFEST).unlink()  # the same config: made to run again on the grown table
        before = sim_stats(url)["answered"]
        summary = teach.run(more, progress=False)
        assert sim_stats(url)["answered"] - before == 2 * 4 * 2 and summary["rows"] == 48
        rows = read_table(stage_dir(more, "teach"), "completions")
        assert len({(r["sample_index"], r["sample_idx"]) for r in rows}) == len(rows) == 48  # no duplicate row


def test_a_cache_from_before_blocks_is_migrated_and_nothing_in_it_asked_again(ray_session, tmp_path):
    with running_sim(TeacherSimConfig(error_rate=0.0)) as url:
        cfg = make_cfg(tmp_path, url)
        write_data_stage(cfg, add_problems(6))
        teach.run(cfg, progress=False)
        store = AnswerStore(teach.cache_dir(cfg))
        answers = [r for name in store.block_names() for r in store.read_block(name)]
        assert len(answers) == 24
        for name in store.block_names():  # the same answers, as the old one-file-per-answer cache held them
            (Path(store.blocks) / name).unlink()
        for rec in answers:
            path = Path(store.root) / rec["key"][:2] / f"{rec['key']}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps({k: v for k, v in rec.items() if k != "key"}))
        (stage_dir(cfg, "teach") / MANIFEST).unlink()
        sent = sim_stats(url)["requests"]["/v1/completions"]
        again = teach.run(cfg, progress=False)
        assert sim_stats(url)["requests"]["/v1/completions"] == sent and again["cache_hits"] == 24
        assert not store.legacy_files() and store.block_names()


# --------------------------------------------------------------------------- the job-wide gate


def test_two_workers_share_the_rate_limit_and_a_429_pauses_both(ray_session, tmp_path):
    """rpm=600: a second's burst (10) and 590 a minute after it. The 20th request is answered 429 with
    Retry-After 2 s: neither worker sends while the job is paused."""
    with running_sim(TeacherSimConfig(error_rate=0.0, fail_429_at=20, retry_after_s=2.0)) as url:
        cfg = make_cfg(tmp_path, url, **{"teacher.samples": 1, "teacher.num_actors": 2, "teacher.rpm": 600,
                                          "teacher.concurrency": 8, "teacher.batch_size": 4})
        write_data_stage(cfg, add_problems(40))
        summary = teach.run(cfg, progress=False)
        log = sim_stats(url, full=True)["request_log"]
    assert summary["errors"] == 0 and summary["retries"] == 1 and summary["fan_out"]["workers"] == 2
    times = [t for t, _ in log]
    assert len(times) == 81  # 40 rows x 2 steps, and the one answered 429
    # Every window: at most the burst plus the refill (granted so at the gate; a request or two may arrive
    # bunched behind another's slot). Without the gate, all 81 would arrive within a second.
    for width in (1.0, 2.0, 5.0):
        worst = max(sum(1 for u in times if t <= u < t + width) for t in times)
        assert worst <= 10 + 590 / 60 * width + 2, (width, worst)
    assert max(sum(1 for u in times if t <= u < t + 60) for t in times) <= 600
    t429 = times[19]
    before = {ua for t, ua in log[:19]}
    assert len(before) == 2  # both workers were sending
    paused = [(t - t429, ua) for t, ua in log if t429 + 0.5 < t < t429 + 1.9]
    assert not paused, paused  # nobody sent while the job was paused
