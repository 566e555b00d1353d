"""Student models: built by architecture + size name from a config (trained from scratch), or
loaded from `student.pretrained` (a local folder or hub id), optionally wrapped with LoRA."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
)

from ..config import LoraConfig, StudentConfig

# (layers, width, heads). T5 splits its layers between encoder and decoder (tiny: 2 + 2).
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (4, 128, 4),  # ~1M parameters with a 1k vocabulary
    "small": (6, 256, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),  # GPT-2 base / T5-base-like shapes
}

# LoRA targets per architecture when `student.lora.target_modules` is unset.
LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "t5": ["q", "v"]}


def family_of(config: PretrainedConfig) -> str:
    return "encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "decoder"


def model_config(student: StudentConfig, tokenizer, max_length: int) -> PretrainedConfig:
    """The transformers config of a from-scratch student, sized by name."""
    if student.size not in SIZES:
        raise ValueError(f"student.size={student.size!r} is not a known size; sizes: {', '.join(SIZES)}")
    layers, width, heads = SIZES[student.size]
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    vocab = len(tokenizer)
    if student.arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=max_length, n_embd=width, n_layer=layers, n_head=heads,
                          resid_pdrop=student.dropout, embd_pdrop=student.dropout, attn_pdrop=student.dropout,
                          bos_token_id=tokenizer.eos_token_id, **ids)
    if student.arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 4 * 2 // 3 // 8 * 8,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                           max_position_embeddings=max_length, tie_word_embeddings=True,
                           attention_dropout=student.dropout,
                           bos_token_id=tokenizer.eos_token_id, **ids)
    if student.arch == "t5":
        half = max(1, layers // 2)
        return T5Config(vocab_size=vocab, d_model=width, d_ff=width * 4, d_kv=width // heads, num_layers=half,
                        num_decoder_layers=half, num_heads=heads, decoder_start_token_id=tokenizer.pad_token_id,
                        feed_forward_proj="relu", dropout_rate=student.dropout, **ids)
    raise ValueError(f"student.arch={student.arch!r} is not a known architecture; archs: gpt2, llama, t5")


def auto_class(family: str):
    return AutoModelForSeq2SeqLM if family == "encoder-decoder" else AutoModelForCausalLM


def build_model(student: StudentConfig, tokenizer, max_length: int) -> PreTrainedModel:
    """A from-scratch student (seeded by the caller) or the pretrained one, checked against the tokenizer."""
    if student.pretrained:
        model = load_pretrained(student)
    else:
        cfg = model_config(student, tokenizer, max_length)
        model = auto_class(student.family).from_config(cfg)
    fit_to_tokenizer(model, tokenizer, student)
    return model


def load_pretrained(student: StudentConfig) -> PreTrainedModel:
    try:
        config = AutoConfig.from_pretrained(student.pretrained)
    except (OSError, ValueError) as e:
        raise ValueError(f"student.pretrained={student.pretrained!r}: cannot load a model config: {e}") from None
    check_family(config, student)
    return auto_class(family_of(config)).from_pretrained(student.pretrained)


def check_family(config: PretrainedConfig, student: StudentConfig) -> None:
    """The curate stage formats pairs by `student.arch`'s family, so a pretrained model must match it."""
    family = family_of(config)
    if family != student.family:
        hint = "t5" if family == "encoder-decoder" else "gpt2 or llama"
        raise ValueError(
            f"student.pretrained={student.pretrained!r} is a {family} model ({config.model_type}) but "
            f"student.arch={student.arch!r} is {student.family}: set student.arch to {hint}"
        )


def fit_to_tokenizer(model: PreTrainedModel, tokenizer, student: StudentConfig) -> None:
    """Refuse a tokenizer whose ids the model cannot embed; grow embeddings only for pad/eos we added."""
    n_tok = len(tokenizer)
    n_emb = model.get_input_embeddings().weight.shape[0]
    if n_tok > n_emb:
        added = len(tokenizer.get_added_vocab())
        if student.pretrained and student.tokenizer is None and n_tok - n_emb <= 2 and added:
            model.resize_token_embeddings(n_tok)  # the pad (and eos) token load_tokenizer added
        else:
            raise ValueError(
                f"tokenizer/model mismatch: the tokenizer has {n_tok} tokens but the model embeds only {n_emb} "
                f"(student.tokenizer={student.tokenizer!r}, student.pretrained={student.pretrained!r}); "
                "use the model's own tokenizer or a from-scratch student"
            )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if model.config.is_encoder_decoder and model.config.decoder_start_token_id is None:
        model.config.decoder_start_token_id = tokenizer.pad_token_id


def apply_lora(model: PreTrainedModel, lora: LoraConfig, arch: str):
    """Wrap with a peft LoRA adapter; only adapter weights train (export merges them back)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    targets = lora.target_modules or LORA_TARGETS.get(model.config.model_type) or LORA_TARGETS[arch]
    task = TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
    peft_cfg = PeftLoraConfig(task_type=task, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=targets, fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2's Conv1D
    return get_peft_model(model, peft_cfg)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
