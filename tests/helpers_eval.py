"""Tiny students for the eval tests and benchmark: random-init GPT-2 / T5 + a BPE tokenizer trained here.

The folder has exactly the shape of the train stage's export (`<train out>/student/`):
save_pretrained model (safetensors) + tokenizer with `<pad>` and `<eos>` special tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lou"]


def coin_questions(n: int, seed: int = 0, min_people: int = 1, max_people: int = 6) -> list[dict]:
    """Coin-flip-like questions of varied length (so batches really need padding)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        heads = True
        steps = []
        for name in rng.sample(NAMES, rng.randint(min_people, max_people)):
            if rng.random() < 0.5:
                steps.append(f"{name} flips the coin.")
                heads = not heads
            else:
                steps.append(f"{name} does not flip the coin.")
        q = "A coin is heads up. " + " ".join(steps) + " Is the coin still heads up?"
        out.append({"sample_index": i, "question": q, "answer": "yes" if heads else "no"})
    return out


def train_tokenizer(texts: list[str], vocab_size: int = 400):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=["<pad>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>")


def corpus() -> list[str]:
    texts = [q["question"] for q in coin_questions(300, seed=123)]
    texts += ["yes no --> The answer is Therefore, the answer is Q: A: Let's think step by step. ###"] * 5
    return texts


def build_student(folder: Path, family: str = "decoder", seed: int = 0, eos_boost: float = 0.0,
                  n_layer: int = 2, n_embd: int = 64, init_scale: float = 10.0) -> Path:
    """Random-init tiny student saved with save_pretrained. `eos_boost` makes EOS likelier so some
    rows stop early (exercises padding after EOS in batched generation)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    tok = train_tokenizer(corpus())
    pad, eos = tok.pad_token_id, tok.eos_token_id
    if family == "decoder":
        cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=n_embd, n_layer=n_layer, n_head=4,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
                         initializer_range=init_scale * 0.02)
        model = GPT2LMHeadModel(cfg)
        head = model.lm_head
    else:
        cfg = T5Config(vocab_size=len(tok), d_model=n_embd, d_ff=2 * n_embd, d_kv=16, num_layers=n_layer,
                       num_decoder_layers=n_layer, num_heads=4, eos_token_id=eos, pad_token_id=pad,
                       decoder_start_token_id=pad, tie_word_embeddings=False,
                       initializer_factor=max(1.0, 0.15 * init_scale))  # T5 grows faster per layer
        model = T5ForConditionalGeneration(cfg)
        head = model.lm_head
    if eos_boost:
        with torch.no_grad():
            head.weight[eos] *= eos_boost
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
