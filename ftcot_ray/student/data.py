"""Training pairs -> token ids with completion-only labels, and the batch collator.

Decoder-only: input = prompt ids + completion ids + EOS; labels = -100 on the prompt (and on
padding), the completion ids + EOS elsewhere, so the loss is on the completion only.
Encoder-decoder: input = prompt ids; labels = completion ids + EOS (the decoder is fed the
labels shifted right from `decoder_start_token_id`, which the model does itself).
Sequences over `train.max_length` are truncated (counted in the stats) or refused, per config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE = -100


@dataclass
class EncodeStats:
    examples: int = 0
    truncated_count: int = 0
    dropped_no_target: int = 0  # prompts that fill the whole limit leave nothing to learn
    max_seen_length: int = 0
    label_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Encoded:
    examples: list[dict] = field(default_factory=list)  # {"input_ids": [...], "labels": [...]}
    stats: EncodeStats = field(default_factory=EncodeStats)


def split_pairs(rows: list[dict], path: Path | str) -> tuple[list[dict], list[dict]]:
    """(train, val) rows of a pair file; a clear error when nothing is left to train on."""
    for i, row in enumerate(rows, 1):
        missing = [k for k in ("prompt", "completion", "split") if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks column(s) {', '.join(missing)}")
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    if not train:
        raise ValueError(
            f"no curated rows left to train on in {path} ({len(rows)} rows, none with split 'train'): "
            "the teacher got too few answers right, or curate filtered them all; check the curate summary"
        )
    return train, val


def _where(row: dict) -> str:
    return f"sample_index={row.get('sample_index')} sample_idx={row.get('sample_idx')}"


def encode_pairs(rows: list[dict], tokenizer, family: str, max_length: int, on_overlength: str = "truncate",
                 source: str = "pairs") -> Encoded:
    out = Encoded()
    if not rows:  # e.g. no val split (curate.val_fraction=0)
        return out
    eos = tokenizer.eos_token_id
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    completions = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    for row, p, c in zip(rows, prompts, completions):
        c = list(c) + [eos]
        if family == "encoder-decoder":
            ex, over = _encode_seq2seq(p, c, max_length)
        else:
            ex, over = _encode_decoder(p, c, max_length)
        length = len(p) + len(c)
        out.stats.max_seen_length = max(out.stats.max_seen_length, length)
        if over:
            if on_overlength == "refuse":
                raise ValueError(
                    f"{source}: {_where(row)} is {length} tokens, over train.max_length={max_length} "
                    "(set train.on_overlength=truncate to cut it, or raise train.max_length)"
                )
            out.stats.truncated_count += 1
        if ex is None:
            out.stats.dropped_no_target += 1
            continue
        out.examples.append(ex)
        out.stats.label_tokens += sum(1 for t in ex["labels"] if t != IGNORE)
    out.stats.examples = len(out.examples)
    return out


def _encode_decoder(p: list[int], c: list[int], max_length: int) -> tuple[dict | None, bool]:
    ids = list(p) + c
    labels = [IGNORE] * len(p) + c
    over = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]  # the paper truncates inputs and labels alike
    if all(t == IGNORE for t in labels):
        return None, over
    return {"input_ids": ids, "labels": labels}, over


def _encode_seq2seq(p: list[int], c: list[int], max_length: int) -> tuple[dict | None, bool]:
    over = len(p) > max_length or len(c) > max_length
    return {"input_ids": list(p)[:max_length], "labels": c[:max_length]}, over


def collate(batch: list[dict], pad_id: int, family: str) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples; padding is masked from attention and from the loss."""
    n = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), n), dtype=torch.long)
    m = n if family == "decoder" else max(len(ex["labels"]) for ex in batch)
    labels = torch.full((len(batch), m), IGNORE, dtype=torch.long)
    for i, ex in enumerate(batch):
        k = len(ex["input_ids"])
        input_ids[i, :k] = torch.tensor(ex["input_ids"])
        attention[i, :k] = 1
        labels[i, : len(ex["labels"])] = torch.tensor(ex["labels"])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batch_tokens(batch: dict[str, torch.Tensor], family: str) -> int:
    """Real (non-pad) tokens a step processes: inputs, plus decoder labels for encoder-decoders."""
    n = int(batch["attention_mask"].sum())
    if family == "encoder-decoder":
        n += int((batch["labels"] != IGNORE).sum())
    return n
