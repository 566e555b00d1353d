"""Export a trained student as a plain Hugging Face folder (safetensors + tokenizer + config +
generation_config) that `AutoModelFor{CausalLM,Seq2SeqLM}.from_pretrained` loads without Ray or DeepSpeed.

Under ZeRO-3 each rank holds a slice of every parameter, so the full weights are gathered first
(a collective: every rank must call :func:`gathered_state_dict`). LoRA adapters are merged into
the base weights, so the folder is a plain model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import GenerationConfig, PretrainedConfig

from ..config import LoraConfig
from .model import apply_lora, auto_class, family_of


def gathered_state_dict(module: torch.nn.Module, zero_stage: int, rank: int) -> dict | None:
    """Full fp32 weights on rank 0 (None elsewhere); every rank must call it under ZeRO-3."""
    ctx = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with ctx:
        if rank != 0:
            return None
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}


def save_student(state_dict: dict, base_config: PretrainedConfig, tokenizer, out_dir: Path | str,
                 lora: LoraConfig | None = None, arch: str = "gpt2") -> Path:
    """Rebuild the architecture on CPU, load the weights, merge LoRA, save a plain HF folder."""
    out_dir = Path(out_dir)
    family = family_of(base_config)
    model = auto_class(family).from_config(base_config)
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora, arch)
        model.load_state_dict(state_dict, strict=True)
        model = model.merge_and_unload()
    else:
        model.load_state_dict(state_dict, strict=True)
    model.config.use_cache = True  # training may have turned it off for gradient checkpointing
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    gen = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    if family == "encoder-decoder":
        gen.decoder_start_token_id = base_config.decoder_start_token_id
    gen.save_pretrained(out_dir)
    return out_dir


def export_untrained(folder: Path | str, texts: list[str], *, arch: str = "gpt2", size: str = "tiny",
                     vocab_size: int = 400, seed: int = 0, method: str = "ft_cot", dataset: str = "coin_flip_synth",
                     max_length: int = 512, weight_scale: float = 1.0, eos_boost: float = 1.0) -> Path:
    """A from-scratch student with random weights, exported exactly as the train stage exports a
    trained one (tokenizer trained on `texts`, save_pretrained folder, student card): for tests,
    benchmarks and trying a server without training first. `weight_scale` > 1 makes its output
    varied; `eos_boost` > 1 makes it stop early sometimes (exercises padding after EOS)."""
    from ..config import DataConfig, StudentConfig
    from ..tasks.custom import resolve_task
    from .card import card_for, write_card
    from .model import build_model
    from .tokenizer import train_tokenizer

    tok = train_tokenizer(texts, vocab_size)
    student = StudentConfig(arch=arch, size=size, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = build_model(student, tok, max_length)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(weight_scale)
        head = model.get_output_embeddings().weight
        head[tok.eos_token_id] *= eos_boost
    folder = save_student(model.state_dict(), model.config, tok, folder, None, arch)
    rules = resolve_task(DataConfig(dataset=dataset))
    write_card(folder, card_for(student.family, method, dataset, rules, max_length))
    return folder
