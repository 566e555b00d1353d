"""Generation with an exported student folder (plain transformers; no Ray, no DeepSpeed).

Batched decoding for throughput: prompts are sorted by token length and cut into micro-batches
so little padding is computed; decoder-only students are LEFT-padded (the new tokens must follow
the last real prompt token in every row) and the prompt is sliced off the output; generation
stops at EOS (the train stage ends every completion with it). Prompts are tokenized by
`student.data.prompt_ids`, the function training uses. Sampling (temperature > 0) is seeded per
question (`seeds`, e.g. eval.seed + sample_index), so sampled outputs do not depend on how questions are
batched or spread over replicas. `generate_one` is the per-example reference (the original repo's
shape) that the equality test and the benchmark compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from ..errors import DataError, InputMissing

Family = Literal["decoder", "encoder-decoder"]


@dataclass
class Student:
    model: "torch.nn.Module"
    tokenizer: object
    family: Family
    path: str

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def model_type(self) -> str:
        return getattr(self.model.config, "model_type", "unknown")


@dataclass
class Generation:
    text: str  # the completion only (prompt stripped, special tokens removed)
    n_tokens: int  # generated tokens up to and including EOS (padding after EOS not counted)


def load_student(path: str | Path, torch_threads: int | None = None) -> Student:
    """Load a `save_pretrained` folder; the family comes from `config.is_encoder_decoder`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputMissing(
            f"student folder {path} has no config.json: expected a save_pretrained folder "
            f"(the train stage writes <train out>/student/)"
        )
    if torch_threads:
        torch.set_num_threads(torch_threads)
    config = AutoConfig.from_pretrained(path)
    family: Family = "encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "decoder"
    cls = AutoModelForSeq2SeqLM if family == "encoder-decoder" else AutoModelForCausalLM
    model = cls.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # pretrained GPT-2s ship without one
        tokenizer.pad_token = tokenizer.eos_token
    # Left padding: in a batch every row's next token must come right after its own prompt.
    tokenizer.padding_side = "left" if family == "decoder" else "right"
    return Student(model=model, tokenizer=tokenizer, family=family, path=str(path))


def _gen_kwargs(student: Student, max_new_tokens: int, num_samples: int, temperature: float) -> dict:
    tok = student.tokenizer
    kw = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        num_return_sequences=num_samples,
        use_cache=True,
    )
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False, num_beams=1)
    return kw


def _decode(student: Student, new_ids: torch.Tensor) -> list[Generation]:
    """Per row: cut at the first EOS, count tokens, decode without special tokens."""
    tok = student.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    out = []
    for row in new_ids.tolist():
        n = len(row)
        if eos in row:
            n = row.index(eos) + 1
        elif pad is not None and pad != eos:
            while n and row[n - 1] == pad:  # finished-early rows are padded to the batch's length
                n -= 1
        out.append(Generation(tok.decode(row[:n], skip_special_tokens=True), n))
    return out


def encode_prompts(student: Student, prompts: Sequence[str]) -> list[list[int]]:
    from .data import prompt_ids

    return [prompt_ids(student.tokenizer, p, student.family) for p in prompts]


def pad_left_or_right(student: Student, ids: Sequence[Sequence[int]]) -> dict:
    """A padded batch on the tokenizer's padding side (left for decoder-only students)."""
    return student.tokenizer.pad({"input_ids": [list(x) for x in ids]}, return_tensors="pt")


@torch.no_grad()
def _generate_batch(student: Student, ids: Sequence[Sequence[int]], kwargs: dict) -> list[Generation]:
    enc = pad_left_or_right(student, ids)
    ids = student.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
    if student.family == "decoder":
        ids = ids[:, enc["input_ids"].shape[1]:]  # strip the (left-padded) prompt
    else:
        ids = ids[:, 1:]  # the decoder start token
    return _decode(student, ids)


def generate(
    student: Student,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    num_samples: int = 1,
    temperature: float = 0.0,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    synced: bool = False,
) -> list[list[Generation]]:
    """Batched generation: for each prompt, `num_samples` generations (greedy when temperature == 0).

    Prompts are processed in micro-batches of similar token length (sorted), and results are
    returned in the input order.
    """
    if num_samples > 1 and temperature <= 0:
        raise ValueError("num_samples > 1 needs temperature > 0 (greedy samples would all be equal)")
    ids = encode_prompts(student, prompts)
    _check_length(student, max((len(x) for x in ids), default=0), max_new_tokens)
    kwargs = _gen_kwargs(student, max_new_tokens, num_samples, temperature)
    if synced:  # ZeRO-3 inside training: every rank keeps stepping until all are done
        kwargs["synced_gpus"] = True
    if temperature > 0:
        # One question at a time (its k samples are still one batch), seeded by its own number:
        # the outputs are the same whatever the batch size or the number of replicas.
        base = 0 if seed is None else seed
        seeds = list(seeds) if seeds is not None else [base + i for i in range(len(ids))]
        out = []
        for x, s in zip(ids, seeds):
            torch.manual_seed(s)
            out.append(_generate_batch(student, [x], kwargs))
        return out
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    results: list[list[Generation]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        gens = _generate_batch(student, [ids[i] for i in chunk], kwargs)
        for j, i in enumerate(chunk):
            results[i] = [gens[j]]
    return results


def _check_length(student: Student, prompt_tokens: int, max_new_tokens: int) -> None:
    """A decoder-only model cannot attend past its position table: say so instead of an IndexError."""
    if student.family != "decoder":
        return
    cfg = student.model.config
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if limit and prompt_tokens + max_new_tokens > limit:
        raise DataError(
            f"student {student.path}: a prompt of {prompt_tokens} tokens + eval.max_new_tokens={max_new_tokens} "
            f"exceeds its {limit} positions; lower eval.max_new_tokens or use a shorter prompt (few-shot-CoT "
            f"exemplars are long)"
        )


def generate_one(student: Student, prompt: str, *, max_new_tokens: int = 128) -> Generation:
    """Reference path: one prompt, no padding, greedy (the original repo's per-example loop)."""
    kwargs = _gen_kwargs(student, max_new_tokens, 1, 0.0)
    return _generate_batch(student, encode_prompts(student, [prompt]), kwargs)[0]
