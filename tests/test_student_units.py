"""Student building blocks without Ray: tokenizer, completion-only labels, models, DeepSpeed config, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftcot_ray.config import load_config, with_overrides
from ftcot_ray.student.data import (IGNORE, collate, encode_pairs, global_batch, micro_batches, prompt_ids,
                                    split_pairs, token_loss)
from ftcot_ray.student.ds_config import ds_config
from ftcot_ray.student.export import gathered_state_dict, save_student
from ftcot_ray.student.loop import improves, plan
from ftcot_ray.student.model import SIZES, apply_lora, build_model, count_params
from ftcot_ray.student.tokenizer import load_tokenizer, pair_texts, train_tokenizer

from helpers_train import NAMES, coin_pairs, load_and_generate


@pytest.fixture(scope="module")
def pairs():
    return coin_pairs(24, "decoder")


@pytest.fixture(scope="module")
def tok(pairs):
    cot, van = pairs
    return train_tokenizer(pair_texts(cot + van), vocab_size=400)


def student(arch="gpt2", **kw):
    return load_config("quickstart", {"student.arch": arch, **{f"student.{k}": v for k, v in kw.items()}}).student


def test_tokenizer_special_tokens_and_names_are_single_tokens(tok):
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>"
    assert tok.pad_token_id != tok.eos_token_id
    for name in NAMES:  # ARCHITECTURE.md, facts: a split name gets garbled by the student
        assert len(tok(f" {name}", add_special_tokens=False)["input_ids"]) == 1, name
    text = "Ann flips the coin. --> yes"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_decoder_labels_mask_prompt_and_padding_on_a_batch(pairs, tok):
    cot, _ = pairs
    enc = encode_pairs(cot[:4], tok, "decoder", max_length=128)
    batch = collate(enc.examples, tok.pad_token_id, "decoder")
    for i, row in enumerate(cot[:4]):
        n_prompt = len(tok(row["prompt"], add_special_tokens=False)["input_ids"])
        n_comp = len(tok(row["completion"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
        labels, ids, mask = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i]
        assert (labels[:n_prompt] == IGNORE).all()  # no loss on the prompt
        target = labels[n_prompt:n_prompt + n_comp]
        assert (target == ids[n_prompt:n_prompt + n_comp]).all()  # loss on the completion...
        assert target[-1] == tok.eos_token_id  # ...which ends in EOS
        assert (labels[n_prompt + n_comp:] == IGNORE).all() and (mask[n_prompt + n_comp:] == 0).all()
        assert tok.decode(target[:-1]) == row["completion"]


def test_seq2seq_labels_are_completion_plus_eos(tok):
    cot, _ = coin_pairs(3, "encoder-decoder")
    enc = encode_pairs(cot, tok, "encoder-decoder", max_length=128)
    batch = collate(enc.examples, tok.pad_token_id, "encoder-decoder")
    row = cot[0]
    assert tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]) == row["prompt"]
    labels = [t for t in batch["labels"][0].tolist() if t != IGNORE]
    assert labels[-1] == tok.eos_token_id and tok.decode(labels[:-1]) == row["completion"]


def test_overlength_truncates_with_a_count_or_refuses(pairs, tok):
    cot, _ = pairs
    enc = encode_pairs(cot, tok, "decoder", max_length=30)
    assert enc.stats.truncated_count == len(cot) and all(len(e["input_ids"]) <= 30 for e in enc.examples)
    with pytest.raises(ValueError, match=r"pairs.jsonl: sample_index=0 sample_idx=0 is \d+ tokens, over train.max_length=30"):
        encode_pairs(cot, tok, "decoder", max_length=30, on_overlength="refuse", source="pairs.jsonl")


def test_no_curated_rows_left_is_a_clear_error(pairs):
    cot, _ = pairs
    with pytest.raises(ValueError, match="no curated rows left to train on in x/ft_cot_pairs.jsonl"):
        split_pairs([r for r in cot if r["split"] == "val"], "x/ft_cot_pairs.jsonl")
    assert encode_pairs([], None, "decoder", 32).examples == []  # no val split is fine


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_tiny_models_build_by_name_and_loss_matches_model_loss(arch, tok):
    model = build_model(student(arch), tok, max_length=128).eval()  # no dropout: compare exact losses
    assert 0.3e6 < count_params(model) < 2e6  # "tiny": about 1M parameters
    family = "encoder-decoder" if arch == "t5" else "decoder"
    cot, _ = coin_pairs(3, family)
    batch = collate(encode_pairs(cot, tok, family, 128).examples, tok.pad_token_id, family)
    total, n = token_loss(model, batch, family)
    assert float(total.detach()) / n == pytest.approx(float(model(**batch).loss), rel=1e-4)  # same masking and shift as HF


def test_unknown_size_and_tokenizer_mismatch_are_clear_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="student.size='huge' is not a known size; sizes: tiny"):
        build_model(student(size="huge"), tok, 128)
    small_tok = train_tokenizer(["a b c"] * 3, vocab_size=270)
    folder = tmp_path / "pre"
    build_model(student(), small_tok, 64).save_pretrained(folder)
    small_tok.save_pretrained(folder)
    tok.save_pretrained(tmp_path / "bigtok")
    with pytest.raises(ValueError, match="tokenizer/model mismatch: the tokenizer has"):
        build_model(student(pretrained=str(folder), tokenizer=str(tmp_path / "bigtok")), load_tokenizer(str(tmp_path / "bigtok")), 64)
    with pytest.raises(ValueError, match="is a decoder model .* student.arch='t5' is encoder-decoder"):
        build_model(student("t5", pretrained=str(folder)), small_tok, 64)


def test_pretrained_folder_loads_and_gets_a_pad_token(tok, tmp_path):
    folder = tmp_path / "pre"
    model = build_model(student(), tok, 64)
    model.save_pretrained(folder)
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>")  # no pad, like GPT-2
    bare.save_pretrained(folder)
    loaded_tok = load_tokenizer(str(folder))
    assert loaded_tok.pad_token is not None and loaded_tok.pad_token_id != loaded_tok.eos_token_id
    loaded = build_model(student(pretrained=str(folder)), loaded_tok, 64)
    assert torch.equal(loaded.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)
    with pytest.raises(ValueError, match="cannot load a model config"):
        build_model(student(pretrained=str(tmp_path / "missing")), tok, 64)


def test_ds_config_follows_train_config():
    cfg = load_config("quickstart")
    t = with_overrides(cfg, {"train.zero_stage": 3, "train.precision": "bf16", "train.num_workers": 4,
                             "train.micro_batch_size": 4, "train.batch_size": 32, "train.offload": True}).train
    c = ds_config(t, world_size=4)
    # batch_size is global: 4 workers x micro-batch 4 x accumulation 2
    assert c["train_batch_size"] == 32 and c["train_micro_batch_size_per_gpu"] == 4
    assert c["gradient_accumulation_steps"] == 2 == t.grad_accum()
    assert c["zero_optimization"]["stage"] == 3 and c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert c["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_plan_counts_steps_of_the_global_batch():
    cfg = load_config("quickstart", {"train.max_steps": None, "train.epochs": 20, "train.batch_size": 8})
    p = plan(cfg.train, 40)
    assert (p["per_epoch"], p["total"], p["eval_every"]) == (5, 100, 10)
    p = plan(with_overrides(cfg, {"train.max_steps": 7, "train.eval_every_steps": 3}).train, 40)
    assert (p["total"], p["eval_every"], p["ckpt_every"]) == (7, 3, 3)


@pytest.mark.parametrize("world,accum", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1)])
def test_a_global_batch_is_the_same_examples_for_any_split(world, accum):
    n, b = 37, 8  # not a multiple: batches run on across epoch boundaries
    for step in (0, 3, 4, 9):
        batch = global_batch(n, b, step, seed=5)
        parts = [mb for r in range(world) for mb in micro_batches(batch, r, world, accum)]
        assert sorted(i for mb in parts for i in mb) == sorted(batch)  # every example once, whatever the split
        assert len({len(mb) for mb in parts}) == 1  # and evenly
    assert global_batch(n, b, 4, 5) == global_batch(n, b, 4, 5) != global_batch(n, b, 4, 6)
    stream = [i for s in range(37) for i in global_batch(n, b, s, 5)]  # 37 steps x 8 = 8 epochs
    assert all(sorted(stream[e * n:(e + 1) * n]) == list(range(n)) for e in range(8))  # each epoch sees all once


def test_selection_rules():
    a = {"step": 10, "val_accuracy": 0.8, "val_loss": 0.5}
    assert improves("val_accuracy", a, None)
    assert improves("val_accuracy", {"step": 20, "val_accuracy": 0.9, "val_loss": 0.9}, a)
    assert not improves("val_accuracy", {"step": 20, "val_accuracy": 0.7, "val_loss": 0.1}, a)
    assert improves("val_accuracy", {"step": 20, "val_accuracy": 0.8, "val_loss": 0.4}, a)  # tie: lower loss
    assert not improves("val_accuracy", {"step": 20, "val_accuracy": 0.8, "val_loss": 0.5}, a)  # tie: earlier
    assert improves("val_loss", {"step": 20, "val_accuracy": 0.1, "val_loss": 0.4}, a)
    assert improves("last", {"step": 20, "val_accuracy": 0.0, "val_loss": 9.0}, a)


def test_export_with_lora_merges_into_a_plain_folder(tok, tmp_path):
    s = student(lora={"enabled": True, "r": 4, "alpha": 8})
    torch.manual_seed(0)
    base = build_model(s, tok, 64)
    base_config = base.config
    peft_model = apply_lora(base, s.lora, "gpt2")
    for name, p in peft_model.named_parameters():  # a trained adapter: B is zero at init, so set it
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    prompt = "A coin is heads up. Ann flips the coin. ###"
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    peft_model.eval()
    expected = peft_model(input_ids=ids).logits
    sd = gathered_state_dict(peft_model, zero_stage=2, rank=0)
    out = save_student(sd, base_config, tok, tmp_path / "student", s.lora, "gpt2")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
    got = load_and_generate(out, "decoder", prompt)
    assert got["new_tokens"] > 0 and got["ray_or_deepspeed_imported"] == []


def test_sizes_are_named():
    assert {"tiny", "small", "base"} <= set(SIZES)
