"""Distilling step-by-step (Hsieh et al. 2023) beside Fine-tune-CoT: the two tasks' pairs, the weighted
two-task loss, and GPT-2 / T5 students that train, evaluate with the label task and load with plain
transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftcot_ray import curation
from ftcot_ray.artifacts import stage_dir
from ftcot_ray.tables import read_table
from ftcot_ray.prompts import TASK_PREFIXES, method_prompt
from ftcot_ray.stages import evaluate, train
from ftcot_ray.student.card import read_card
from ftcot_ray.student.data import collate, encode_pairs, row_weights, token_loss, token_losses
from ftcot_ray.student.model import build_model
from ftcot_ray.student.tokenizer import pair_texts, train_tokenizer
from ftcot_ray.tasks import get_task

from helpers_curate import curate_rows
from helpers_train import coin_pairs, load_and_generate, make_curate_folder, tiny_config


def curated_rows() -> list[dict]:
    base = {"answer_completion": " yes.", "finish_reason": "stop", "error": None}
    rows = [
        {"sample_index": 0, "sample_idx": 0, "split": "train", "question": " Q zero? ", "answer": "yes",
         "rationale": " Ann holds it. ", **base},
        {"sample_index": 0, "sample_idx": 1, "split": "train", "question": " Q zero? ", "answer": "yes",
         "rationale": " Ann flips it.", **base, "answer_completion": " no."},
        {"sample_index": 1, "sample_idx": 0, "split": "val", "question": "Q one?", "answer": "no",
         "rationale": "Bob flips it.", **base, "answer_completion": " no."},
        {"sample_index": 2, "sample_idx": 0, "split": "test", "question": "Q two?", "answer": "no",
         "rationale": "x", **base, "answer_completion": " no."},
    ]
    return curate_rows(rows, get_task("coin_flip_synth"), diversity=2)


def test_each_kept_rationale_gives_a_label_and_a_rationale_pair():
    pairs = curation.step_by_step_pairs(curated_rows(), "decoder")
    # (0, 1) answered wrongly and test questions are never trained on: (0, 0) and (1, 0) remain, twice each.
    assert [(p["sample_index"], p["task"]) for p in pairs] == [(0, "label"), (0, "rationale"), (1, "label"), (1, "rationale")]
    assert pairs[0]["prompt"] == "[label] Q zero? ###" and pairs[0]["completion"] == " yes"  # the gold answer
    assert pairs[1]["prompt"] == "[rationale] Q zero? ###" and pairs[1]["completion"] == " Ann holds it."
    enc = curation.step_by_step_pairs(curated_rows(), "encoder-decoder")
    assert (enc[1]["prompt"], enc[1]["completion"]) == ("[rationale] Q zero?", "Ann holds it.")
    assert method_prompt("step_by_step", "Q?", "decoder") == f"{TASK_PREFIXES['label']}Q? ###"


@pytest.fixture(scope="module")
def two_task_batch():
    cot, _ = coin_pairs(6, "decoder")
    rows = []
    for r in cot:
        q = r["prompt"].removesuffix(" ###")
        rationale, answer = r["completion"].rsplit("-->", 1)
        rows += [{**r, "task": "label", "prompt": f"[label] {q} ###", "completion": f" {answer.strip()}"},
                 {**r, "task": "rationale", "prompt": f"[rationale] {q} ###", "completion": rationale.rstrip()}]
    tok = train_tokenizer(pair_texts(rows), 400)
    examples = encode_pairs(rows, tok, "decoder", 128).examples
    torch.manual_seed(0)
    model = build_model(tiny_config(Path("/tmp")).student, tok, 128).eval()
    return tok, examples, model


def test_the_loss_is_the_label_mean_plus_lambda_times_the_rationale_mean(two_task_batch):
    tok, examples, model = two_task_batch
    assert [e["task"] for e in examples[:2]] == [0, 1]
    indices = list(range(len(examples)))
    batch = collate(examples, tok.pad_token_id, "decoder")
    sums, counts = token_losses(model, batch, "decoder")
    total, n = token_loss(model, batch, "decoder")
    assert float(sums.sum()) == pytest.approx(float(total), rel=1e-6) and int(counts.sum()) == n
    lam = 0.3
    w = row_weights(examples, indices, lam)
    objective = sum(float(sums[i]) * w[i] for i in indices)
    mean = lambda t: sum(float(sums[i]) for i in indices if examples[i]["task"] == t) / sum(  # noqa: E731
        int(counts[i]) for i in indices if examples[i]["task"] == t)
    assert objective == pytest.approx(mean(0) + lam * mean(1), rel=1e-6)
    # One task: the plain token mean of the batch (what Fine-tune-CoT and vanilla use).
    w1 = row_weights(examples, indices, None)
    assert sum(float(sums[i]) * w1[i] for i in indices) == pytest.approx(float(total) / n, rel=1e-6)
    # The label tokens of a label pair are the answer only: the rationale is a separate example.
    label_ex = examples[0]
    assert tok.decode([t for t in label_ex["labels"] if t != -100][:-1]).strip() in ("yes", "no")


def step_by_step_folder(cfg):
    out = make_curate_folder(cfg)
    cot, _ = coin_pairs(48, cfg.student.family)
    from ftcot_ray.artifacts import finish
    from ftcot_ray.io import write_jsonl

    rows = []
    for r in cot:
        q = r["prompt"].removesuffix(" ###")
        rationale, answer = r["completion"].rsplit("-->", 1)
        rows += [{**r, "task": "label", "prompt": method_prompt("step_by_step", q, cfg.student.family),
                  "completion": f" {answer.strip()}" if cfg.student.family == "decoder" else answer.strip()},
                 {**r, "task": "rationale", "prompt": f"[rationale] {q}" + (" ###" if cfg.student.family == "decoder" else ""),
                  "completion": rationale.rstrip()}]
    write_jsonl(out / "step_by_step_pairs.jsonl", rows)  # beside the folder's other pair tables and problems
    finish(out, cfg, "curate")
    return out


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_students_train_and_evaluate_with_the_label_task(ray_session, tmp_path, arch):
    cfg = tiny_config(tmp_path, arch, **{"train.method": "step_by_step", "train.rationale_weight": 0.5,
                                         "train.max_steps": 20, "train.eval_every_steps": 10,
                                         "eval.max_new_tokens": 24, "eval.rationales": True, "eval.split": "val"})
    curate = step_by_step_folder(cfg)
    summary = train.run(cfg)
    metrics = json.loads((stage_dir(cfg, "train") / "metrics.json").read_text())
    assert summary["steps"] == 20 and metrics["method"] == "step_by_step"
    label_losses = [x[1] for x in metrics["task_losses"]]
    rationale_losses = [x[2] for x in metrics["task_losses"]]
    assert label_losses[-1] < label_losses[0] and rationale_losses[-1] < rationale_losses[0]  # both tasks learn
    for step, total in metrics["train_loss"]:  # the objective is label + lambda x rationale
        lab, rat = next((x[1], x[2]) for x in metrics["task_losses"] if x[0] == step)
        assert total == pytest.approx(lab + 0.5 * rat, rel=1e-5)
    assert "val_label_loss" in metrics["val_curve"][-1] and "val_rationale_loss" in metrics["val_curve"][-1]
    student = stage_dir(cfg, "train") / "student"
    card = read_card(student)
    assert card.method == "step_by_step" and card.answer_marker is None
    assert card.prompt("Q?").startswith("[label] ")

    summary = evaluate.run(cfg, tmp_path / "eval", curate)  # the val split of the curate folder
    preds = read_table(tmp_path / "eval", "predictions")
    assert summary["method"] == "step_by_step" and len(preds) == 8
    assert all("rationale" in p for p in preds)  # asked for: the rationale task ran too
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["mean_output_tokens"] <= 24 and m["diversity"] == 1

    family = "encoder-decoder" if arch == "t5" else "decoder"
    got = load_and_generate(student, family, card.prompt("A coin is heads up. Ann flips the coin."))
    assert got["ray_or_deepspeed_imported"] == [] and got["new_tokens"] > 0
