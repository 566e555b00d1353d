"""The train stage for real: local Ray, Ray Train TorchTrainer, 2 CPU workers, DeepSpeed ZeRO 0/2/3.

Also: distributed training equals single-process training (world 1 vs a plain PyTorch loop, world 2
vs world 1 at the same global batch) on pairs of different lengths; the exported student is the
checkpoint selected on validation; a killed (SIGKILL or Ctrl-C) `ftcot train` resumes from its last
checkpoint and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ftcot_ray.artifacts import stage_dir
from ftcot_ray.config import with_overrides
from ftcot_ray.stages import train
from ftcot_ray.stages.train import latest_step

from helpers_train import coin_pairs, coin_problems, load_and_generate, make_curate_folder, tiny_config

REPO = Path(__file__).resolve().parents[1]
# 40 train pairs / global batch 8 = 5 steps an epoch; 30 steps = 6 epochs; validation every 5 steps.


def metrics_of(cfg) -> dict:
    return json.loads((stage_dir(cfg, "train") / "metrics.json").read_text())


def assert_trained_and_exported(summary: dict, cfg, zero_stage: int) -> dict:
    out = stage_dir(cfg, "train")
    metrics = metrics_of(cfg)
    assert summary["steps"] == metrics["steps"] == 30
    first, last = metrics["train_loss"][0][1], metrics["train_loss"][-1][1]
    assert last < 0.6 * first, metrics["train_loss"]  # loss falls
    curve = metrics["val_curve"]
    assert [v["step"] for v in curve] == [5, 10, 15, 20, 25, 30] and curve[-1]["val_loss"] < curve[0]["val_loss"]
    assert all(0.0 <= v["val_accuracy"] <= 1.0 and v["val_n"] == 8 for v in curve)
    assert metrics["num_workers"] == 2 and metrics["zero_stage"] == zero_stage and metrics["truncated_count"] == 0
    assert metrics["tokens_per_s"] > 0
    if zero_stage == 3:  # each of the 2 ranks holds half of every parameter
        assert metrics["params_per_rank"] <= metrics["params"] // 2 + 2048
    else:
        assert metrics["params_per_rank"] == metrics["params"]
    student = out / "student"
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json",
            "ftcot_student.json"} <= {p.name for p in student.iterdir()}
    prompt = coin_pairs(1, cfg.student.family)[0][0]["prompt"]
    got = load_and_generate(student, cfg.student.family, prompt)
    assert got["ray_or_deepspeed_imported"] == [] and got["new_tokens"] > 0
    assert got["params"] == metrics["params"]
    return metrics


@pytest.mark.parametrize("arch,zero_stage", [
    ("gpt2", 0), ("gpt2", 2), ("gpt2", 3), ("t5", 3),
    pytest.param("t5", 0, marks=pytest.mark.slow), pytest.param("t5", 2, marks=pytest.mark.slow),
])
def test_zero_stage_trains_and_exports(ray_session, tmp_path, zero_stage, arch):
    cfg = tiny_config(tmp_path, arch, **{"train.zero_stage": zero_stage})
    make_curate_folder(cfg)
    summary = train.run(cfg)
    assert_trained_and_exported(summary, cfg, zero_stage)
    if zero_stage == 2 and arch == "gpt2":
        again = train.run(cfg)  # a finished stage is reused: no training
        assert again["reused"] is True and again["steps"] == 30


@pytest.mark.slow
def test_llama_bf16_grad_ckpt_then_lora_zero3_on_a_pretrained_folder(ray_session, tmp_path):
    cfg = tiny_config(tmp_path, "llama", **{"train.zero_stage": 2, "train.precision": "bf16", "train.grad_ckpt": True})
    make_curate_folder(cfg)
    assert_trained_and_exported(train.run(cfg), cfg, 2)
    # The exported llama becomes a "pretrained" student, fine-tuned again with LoRA under ZeRO-3.
    pre = stage_dir(cfg, "train") / "student"
    lora_cfg = tiny_config(tmp_path / "lora", "llama", **{"student.pretrained": str(pre), "student.lora.enabled": True,
                                                          "student.lora.r": 4, "train.zero_stage": 3, "train.lr": 1e-2})
    make_curate_folder(lora_cfg)
    summary = train.run(lora_cfg)
    metrics = metrics_of(lora_cfg)
    assert summary["steps"] == 30
    # The adapter learned something and the export merged it: the folder's weights moved from the
    # pretrained ones. (Not "the last step's loss < the first's": two single batches of an already
    # trained student differ by noise more than 30 LoRA steps move them.)
    from safetensors.torch import load_file

    before, after = load_file(str(pre / "model.safetensors")), load_file(str(stage_dir(lora_cfg, "train") / "student" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "LoRA training left every weight as it was"
    got = load_and_generate(stage_dir(lora_cfg, "train") / "student", "decoder", "A coin is heads up. ###")
    assert got["new_tokens"] > 0 and got["params"] == metrics["params"]  # merged: no adapter weights left


def test_killed_worker_resumes_from_last_checkpoint(ray_session, tmp_path):
    cfg = tiny_config(tmp_path, "gpt2", **{"train.zero_stage": 2, "train.max_failures": 2})
    make_curate_folder(cfg)
    marker = tmp_path / "killed"
    summary = train.run(cfg, fault={"rank": 1, "at_step": 12, "marker": str(marker)})
    assert marker.read_text().startswith("killed rank 1 at step 12")
    # The last checkpoint Ray Train had registered from every rank: step 10, or step 5 when the kill came
    # before the controller collected rank 1's step-10 report.
    assert summary["restarts"] == 1 and summary["resumed_from_step"] in (5, 10)
    metrics = assert_trained_and_exported(summary, cfg, 2)
    steps = [s for s, _ in metrics["train_loss"]]
    assert steps == list(range(1, 31))  # history continued from the checkpoint, no step logged twice


def test_no_curated_rows_is_a_clear_error(ray_session, tmp_path):
    cfg = tiny_config(tmp_path)
    out = make_curate_folder(cfg)
    (out / "ft_cot_pairs.jsonl").write_text("")
    from ftcot_ray.artifacts import finish

    finish(out, cfg, "curate")  # a curate output that is finished, and empty
    with pytest.raises(ValueError, match="no curated rows left to train on in .*ft_cot_pairs.jsonl"):
        train.run(cfg)


def test_missing_curate_stage_names_the_command(tmp_path):
    from ftcot_ray.artifacts import StageInputMissing

    with pytest.raises(StageInputMissing, match="run `ftcot curate`"):
        train.run(tiny_config(tmp_path))


# --------------------------------------------------------------------------- distributed == single process


def varied_pairs(n: int, seed: int = 0) -> list[dict]:
    """Coin pairs with 1-6 people: completions of very different token lengths (as in real data)."""
    rng = random.Random(seed)
    names = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay"]
    rows = []
    for i in range(n):
        people = rng.sample(names, rng.randint(1, 6))
        flips = [rng.random() < 0.5 for _ in people]
        q = "A coin is heads up. " + " ".join(f"{p} {'flips' if f else 'skips'} the coin." for p, f in zip(people, flips))
        steps = " ".join(f"{p} {'flips' if f else 'skips'}, {sum(flips[:k + 1])} flips." for k, (p, f) in enumerate(zip(people, flips)))
        rows.append({"sample_index": i, "sample_idx": 0, "split": "val" if i % 6 == 5 else "train",
                     "prompt": f"{q} Is the coin still heads up? ###",
                     "completion": f" {steps} --> {'no' if sum(flips) % 2 else 'yes'}"})
    return rows


EQUIV = {"train.max_steps": 12, "train.log_every": 1, "train.eval_every_steps": 12, "train.select": "last",
         "train.lr": 3e-3, "train.batch_size": 8, "train.warmup_ratio": 0.1, "train.val_max_new_tokens": 8}


def varied_curate_folder(cfg) -> Path:
    from ftcot_ray.artifacts import finish
    from ftcot_ray.io import write_jsonl

    out = stage_dir(cfg, "curate")
    pairs = varied_pairs(48)
    write_jsonl(out / "ft_cot_pairs.jsonl", pairs)
    write_jsonl(out / "vanilla_pairs.jsonl", [])
    write_jsonl(out / "problems.jsonl", coin_problems(pairs))
    finish(out, cfg, "curate")
    return out


def plain_loop_losses(cfg, curate: Path) -> list[float]:
    """The reference: one process, the whole global batch at once, torch AdamW, no Ray, no DeepSpeed."""
    from transformers import get_scheduler

    from ftcot_ray.io import read_jsonl
    from ftcot_ray.student.data import collate, encode_pairs, global_batch, token_loss
    from ftcot_ray.student.model import build_model
    from ftcot_ray.student.tokenizer import pair_texts, train_tokenizer

    t, s = cfg.train, cfg.student
    rows = read_jsonl(curate / "ft_cot_pairs.jsonl")
    tok = train_tokenizer(pair_texts(rows), s.vocab_size)
    examples = encode_pairs([r for r in rows if r["split"] == "train"], tok, "decoder", t.max_length).examples
    torch.manual_seed(t.seed)
    model = build_model(s, tok, t.max_length)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = get_scheduler(t.lr_schedule, opt, num_warmup_steps=int(t.warmup_ratio * t.max_steps),
                          num_training_steps=t.max_steps)
    losses = []
    for step in range(t.max_steps):
        batch = collate([examples[i] for i in global_batch(len(examples), t.batch_size, step, t.seed)],
                        tok.pad_token_id, "decoder")
        total, n = token_loss(model, batch, "decoder")
        loss = total / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


@pytest.fixture(scope="module")
def equivalence_runs(ray_session, tmp_path_factory):
    """The same experiment (global batch 8) as 1 worker x 8, 2 workers x 4 (ZeRO-0) and 2 x 4 (ZeRO-2)."""
    runs = {}
    for label, workers, zero in (("w1", 1, 0), ("w2z0", 2, 0), ("w2z2", 2, 2)):
        root = tmp_path_factory.mktemp(label)
        cfg = tiny_config(root, "gpt2", **EQUIV, **{"train.num_workers": workers, "train.zero_stage": zero})
        curate = varied_curate_folder(cfg)
        train.run(cfg)
        runs[label] = (cfg, curate, [loss for _, loss in metrics_of(cfg)["train_loss"]])
    return runs


def test_pairs_really_differ_in_length():
    lengths = {len(p["completion"].split()) for p in varied_pairs(48)}
    assert max(lengths) >= 3 * min(lengths)


def test_one_worker_equals_a_plain_pytorch_loop(equivalence_runs):
    cfg, curate, losses = equivalence_runs["w1"]
    assert losses == pytest.approx(plain_loop_losses(cfg, curate), abs=1e-4)


def test_two_workers_equal_one_worker_at_the_same_global_batch(equivalence_runs):
    """The loss is normalised by the global batch's label tokens, so the split does not change the
    objective: before, each rank's token mean was averaged and long and short completions weighed alike."""
    one = equivalence_runs["w1"][2]
    assert len(one) == 12
    assert equivalence_runs["w2z0"][2] == pytest.approx(one, abs=1e-4)
    assert equivalence_runs["w2z2"][2] == pytest.approx(one, abs=1e-4)
    # The worker count is a runtime setting: the same key, the same experiment.
    assert stage_dir(equivalence_runs["w1"][0], "train").name == stage_dir(equivalence_runs["w2z2"][0], "train").name


# --------------------------------------------------------------------------- selection on validation


def test_the_exported_student_is_the_checkpoint_selected_on_validation(ray_session, tmp_path):
    from ftcot_ray.io import read_jsonl
    from ftcot_ray.student.data import collate, encode_pairs, token_loss
    from ftcot_ray.student.generate import load_student

    # A high constant learning rate overfits 40 pairs: the best val loss is not at the last step.
    cfg = tiny_config(tmp_path, "gpt2", **{"train.select": "val_loss", "train.lr": 2e-2, "train.lr_schedule": "constant",
                                           "train.warmup_ratio": 0.0, "train.max_steps": 40, "train.eval_every_steps": 4})
    curate = make_curate_folder(cfg)
    summary = train.run(cfg)
    m = metrics_of(cfg)
    curve = {v["step"]: v for v in m["val_curve"]}
    best = min(curve.values(), key=lambda v: v["val_loss"])
    assert m["selection"]["step"] == summary["selected_step"] == best["step"]
    assert best["step"] != 40, "this setting should overfit before the end; the test needs a non-last best"
    # The exported weights ARE that checkpoint: their val loss is the one recorded at the selected step.
    student = load_student(stage_dir(cfg, "train") / "student")
    val = [r for r in read_jsonl(curate / "ft_cot_pairs.jsonl") if r["split"] == "val"]
    batch = collate(encode_pairs(val, student.tokenizer, "decoder", 128).examples, student.tokenizer.pad_token_id, "decoder")
    with torch.no_grad():
        total, n = token_loss(student.model, batch, "decoder")
    assert float(total) / n == pytest.approx(best["val_loss"], abs=1e-4)
    assert float(total) / n != pytest.approx(curve[40]["val_loss"], abs=1e-3)


# --------------------------------------------------------------------------- a killed `ftcot train` resumes


def _env() -> dict:
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")


def _start_train(cfg, tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return subprocess.Popen([sys.executable, "-m", "ftcot_ray", "train", "--config", str(path)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_checkpoint(cfg, proc: subprocess.Popen, timeout: float = 240) -> int:
    """The first step Ray Train has registered a checkpoint for (what a re-run restores)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        folders = list(stage_dir(cfg, "train").glob("ray_train/*/"))
        steps = [s for s in (latest_step(f) for f in folders) if s]
        if steps:
            return max(steps)
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint before the run ended: {proc.poll()} {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")


@pytest.mark.parametrize("how", ["sigkill", "ctrl-c"])
def test_killed_train_command_resumes_and_ends_where_an_uninterrupted_run_ends(equivalence_runs, tmp_path, how):
    ref_cfg, _, ref_losses = equivalence_runs["w2z2"]
    cfg = with_overrides(ref_cfg, {"run_dir": str(tmp_path / "run"), "train.checkpoint_every_steps": 3})
    varied_curate_folder(cfg)
    proc = _start_train(cfg, tmp_path)
    at = _wait_for_checkpoint(cfg, proc)
    os.killpg(proc.pid, signal.SIGKILL if how == "sigkill" else signal.SIGINT)  # the whole group, as a terminal does
    _, err = proc.communicate(timeout=120)
    if how == "ctrl-c":
        assert proc.returncode == 130 and "interrupted" in err and "re-run the same command" in err, err[-2000:]
    assert not (stage_dir(cfg, "train") / "manifest.json").exists()

    summary = train.run(cfg)  # the same command again
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] >= at > 0
    losses = [loss for _, loss in metrics_of(cfg)["train_loss"]]
    assert losses == pytest.approx(ref_losses, abs=1e-4)  # the same steps as the uninterrupted run
