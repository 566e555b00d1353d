"""The train stage for real: local Ray, Ray Train TorchTrainer, 2 CPU workers, DeepSpeed ZeRO 0/2/3."""

from __future__ import annotations

import json

import pytest

from ftcot_ray.stages import train

from helpers_train import coin_pairs, load_and_generate, make_curate_folder, tiny_config

# 40 train pairs / 2 workers / batch 4 = 5 steps an epoch; 30 steps = 6 epochs, a checkpoint each.


def assert_trained_and_exported(summary: dict, cfg, zero_stage: int) -> dict:
    out = train.stage_dir(cfg, "train")
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == metrics["steps"] == 30
    first, last = metrics["train_loss"][0][1], metrics["train_loss"][-1][1]
    assert last < 0.6 * first, metrics["train_loss"]  # loss falls
    assert len(metrics["val_loss"]) == 6 and metrics["val_loss"][-1][1] < metrics["val_loss"][0][1]
    assert metrics["num_workers"] == 2 and metrics["zero_stage"] == zero_stage and metrics["truncated_count"] == 0
    assert metrics["tokens_per_s"] > 0
    if zero_stage == 3:  # each of the 2 ranks holds half of every parameter
        assert metrics["params_per_rank"] <= metrics["params"] // 2 + 2048
    else:
        assert metrics["params_per_rank"] == metrics["params"]
    student = out / "student"
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= {p.name for p in student.iterdir()}
    prompt = coin_pairs(1, cfg.student.family)[0][0]["prompt"]
    got = load_and_generate(student, cfg.student.family, prompt)
    assert got["ray_or_deepspeed_imported"] == [] and got["new_tokens"] > 0
    assert got["params"] == metrics["params"]
    return metrics


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_zero_stage_trains_and_exports(ray_session, tmp_path, zero_stage, arch):
    cfg = tiny_config(tmp_path, arch, **{"train.zero_stage": zero_stage})
    make_curate_folder(cfg)
    summary = train.run(cfg)
    assert_trained_and_exported(summary, cfg, zero_stage)
    if zero_stage == 2 and arch == "gpt2":
        again = train.run(cfg)  # a finished stage is reused: no training
        assert again["reused"] is True and again["steps"] == 30


def test_llama_bf16_grad_ckpt_then_lora_zero3_on_a_pretrained_folder(ray_session, tmp_path):
    cfg = tiny_config(tmp_path, "llama", **{"train.zero_stage": 2, "train.precision": "bf16", "train.grad_ckpt": True})
    make_curate_folder(cfg)
    assert_trained_and_exported(train.run(cfg), cfg, 2)
    # The exported llama becomes a "pretrained" student, fine-tuned again with LoRA under ZeRO-3.
    pre = train.stage_dir(cfg, "train") / "student"
    lora_cfg = tiny_config(tmp_path / "lora", "llama", **{"student.pretrained": str(pre), "student.lora.enabled": True,
                                                          "student.lora.r": 4, "train.zero_stage": 3, "train.lr": 1e-2})
    make_curate_folder(lora_cfg)
    summary = train.run(lora_cfg)
    metrics = json.loads((train.stage_dir(lora_cfg, "train") / "metrics.json").read_text())
    assert summary["steps"] == 30 and metrics["train_loss"][-1][1] < metrics["train_loss"][0][1]
    got = load_and_generate(train.stage_dir(lora_cfg, "train") / "student", "decoder", "A coin is heads up. ###")
    assert got["new_tokens"] > 0 and got["params"] == metrics["params"]  # merged: no adapter weights left


def test_killed_worker_resumes_from_last_checkpoint(ray_session, tmp_path):
    cfg = tiny_config(tmp_path, "gpt2", **{"train.zero_stage": 2, "train.max_failures": 2})
    make_curate_folder(cfg)
    marker = tmp_path / "killed"
    summary = train.run(cfg, fault={"rank": 1, "at_step": 12, "marker": str(marker)})
    assert marker.read_text().startswith("killed rank 1 at step 12")
    assert summary["restarts"] == 1  # resumed once, from the epoch-2 checkpoint (step 10)
    metrics = assert_trained_and_exported(summary, cfg, 2)
    steps = [s for s, _ in metrics["train_loss"]]
    assert steps == sorted(set(steps))  # history continued from the checkpoint, no step logged twice


def test_no_curated_rows_is_a_clear_error(ray_session, tmp_path):
    cfg = tiny_config(tmp_path)
    out = make_curate_folder(cfg)
    (out / "ft_cot_pairs.jsonl").write_text("")
    with pytest.raises(ValueError, match="no curated rows left to train on in .*ft_cot_pairs.jsonl"):
        train.run(cfg)


def test_missing_curate_stage_names_the_command(tmp_path):
    from ftcot_ray.artifacts import StageInputMissing

    with pytest.raises(StageInputMissing, match="run `ftcot curate`"):
        train.run(tiny_config(tmp_path))
