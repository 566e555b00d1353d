"""Student tokenizers: a byte-level BPE trained on the task text, or a pretrained one from a path.

From scratch we train on the text of BOTH pair files of a curate folder, so the Fine-tune-CoT
and the vanilla students of one run share one vocabulary (ARCHITECTURE.md, facts: a vocabulary of ~1,000 keeps
every name a single token; smaller ones split names and the student garbles them).
"""

from __future__ import annotations

from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD = "<pad>"
EOS = "<eos>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Byte-level BPE with `<pad>` (id 0) and `<eos>` (id 1) as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, padding_side="right")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A pretrained tokenizer (local folder or hub id); a pad token is added when it has none."""
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path!r} (student.pretrained / student.tokenizer): {e}") from None
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": EOS})
    if tok.pad_token is None:
        # A distinct pad keeps padding apart from the EOS the student must learn to emit.
        tok.add_special_tokens({"pad_token": PAD})
    tok.padding_side = "right"
    return tok


def pair_texts(rows: Iterable[dict]) -> Iterable[str]:
    for row in rows:
        yield row["prompt"]
        yield row["completion"]
