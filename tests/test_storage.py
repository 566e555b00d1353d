"""Run folders by URI, against a real S3-compatible server on 127.0.0.1 (moto in server mode):
stages read and write there, manifests last, a second machine (a fresh local mirror) reuses every stage,
and the teacher cache and Ray Train's checkpoints are in the bucket."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import BUCKET

from ftcot_ray import storage

REPO = Path(__file__).resolve().parents[1]


def keys(client, prefix: str) -> list[str]:
    out, token = [], None
    while True:
        kw = {"Bucket": BUCKET, "Prefix": prefix} | ({"ContinuationToken": token} if token else {})
        r = client.list_objects_v2(**kw)
        out += [o["Key"] for o in r.get("Contents", [])]
        if not r.get("IsTruncated"):
            return out
        token = r["NextContinuationToken"]


def test_push_puts_the_manifest_last_and_pull_restores_the_folder(s3, tmp_path):
    local = tmp_path / "stage"
    (local / "student").mkdir(parents=True)
    (local / "student" / "w.bin").write_bytes(b"\0" * 1000)
    (local / "table.jsonl").write_text('{"a": 1}\n')
    (local / "manifest.json").write_text('{"complete": true}')
    uri = f"s3://{BUCKET}/unit/stage"
    assert storage.remote_manifest(uri) is None and not storage.pull(uri, tmp_path / "nothing")
    storage.push(local, uri)
    assert storage.remote_manifest(uri) == {"complete": True}
    copy = tmp_path / "copy"
    assert storage.pull(uri, copy)
    assert (copy / "student" / "w.bin").read_bytes() == b"\0" * 1000 and (copy / "table.jsonl").is_file()
    assert storage.check_writable(f"s3://{BUCKET}/unit") is None
    assert storage.check_writable("s3://no-such-bucket-ftcot/x") is not None


SMALL = ["data.train_size=48", "data.test_size=16", "data.difficulty=3", "teacher.samples=2",
         "pipeline.diversity=[1]", "pipeline.methods=[ft_cot]", "train.max_steps=8", "train.eval_every_steps=8",
         "train.batch_size=4", "train.val_max_new_tokens=32", "eval.max_new_tokens=48"]


def run(run_dir: str, mirror: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", FTCOT_MIRROR=str(mirror))
    return subprocess.run([sys.executable, "-m", "ftcot_ray", "run", f"run_dir={run_dir}", *SMALL], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_a_run_on_s3_is_reused_from_another_machine(s3, tmp_path):
    run_dir = f"s3://{BUCKET}/runs/quick"
    first = run(run_dir, tmp_path / "machine-a")
    assert first.returncode == 0, first.stderr[-3000:]
    stored = keys(s3, "runs/quick/")
    for stage in ("data", "teach", "curate", "train", "eval"):
        assert any(k.startswith(f"runs/quick/{stage}/") and k.endswith("/manifest.json") for k in stored), stage
    assert any("/train/" in k and "/student/model.safetensors" in k for k in stored)
    assert any("/ray_train/" in k and "checkpoint_" in k for k in stored)  # Ray Train's checkpoints, in the bucket
    assert any(k.startswith("runs/quick/teacher_cache/") for k in stored)  # the teacher's answers too
    assert "runs/quick/report.md" in stored

    second = run(run_dir, tmp_path / "machine-b")  # an empty mirror: everything comes from the bucket
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ("data", "teach", "curate", "train", "eval"):
        assert any(line.startswith(stage) or f"] {stage}:" in line for line in second.stderr.splitlines()
                   if "(reused)" in line), stage
    assert first.stdout.splitlines()[:4] == second.stdout.splitlines()[:4]  # the same table
