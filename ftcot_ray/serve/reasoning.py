"""Rationale and answer of one student output, whole or as it streams (vLLM's reasoning convention).

A Fine-tune-CoT student writes ` {rationale} --> {answer}`: the text before the card's marker is
the reasoning (`message.reasoning`, also `reasoning_content`), and `message.content` is the
answer the task's own rules extract (`evaluation.read_prediction`, the function `ftcot eval`
grades with), not the raw text after the marker. A vanilla student has no rationale: reasoning
is None and content is its first answer candidate. An output without the marker has no answer
(content None, as `ftcot eval` counts it wrong) and all of it is reasoning.

Streaming sends the reasoning as it is written and the answer once the output is complete
(it is read by rules that see the whole tail). `ReasoningStream` holds back what could still
change: trailing whitespace (it may precede the marker) and a tail that may be the start of the
marker, so the streamed pieces always add up to exactly the non-streamed `reasoning`.
"""

from __future__ import annotations

from typing import Optional

from ..evaluation import read_prediction
from ..student.card import StudentCard


def answer_of(card: StudentCard, text: str) -> Optional[str]:
    """The task's answer in one output, read as `ftcot eval` reads it."""
    return read_prediction(card.rules, text, card.method)[0]


def split_output(card: StudentCard, text: str) -> tuple[Optional[str], Optional[str]]:
    """(reasoning, answer) of a finished output."""
    if card.answer_marker is None:
        return None, answer_of(card, text)
    return reasoning_prefix(text, card.answer_marker, final=True), answer_of(card, text)


def reasoning_prefix(text: str, marker: str, final: bool) -> str:
    """The part of `text` that is certainly reasoning: all of it before the marker, stripped.

    Not final: a tail that is a proper prefix of the marker, and trailing whitespace, are held
    back (the longest such tail, so the cut never passes where the marker will start).
    """
    at = text.find(marker)
    if at != -1:
        return text[:at].strip()
    if not final:
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:k]):
                text = text[:-k]
                break
    return text.strip()


class ReasoningStream:
    """Turns the growing raw text of one choice into reasoning deltas."""

    def __init__(self, marker: Optional[str]):
        self.marker = marker
        self.sent = ""

    def delta(self, text: str, final: bool = False) -> str:
        if self.marker is None:
            return ""
        target = reasoning_prefix(text, self.marker, final)
        if not target.startswith(self.sent):  # a tokenizer rewrote earlier text: never retract what was sent
            return ""
        piece, self.sent = target[len(self.sent):], target
        return piece


class TextStream:
    """Incremental detokenization of one row: the new text since the last call.

    Decodes all ids so far (skipping special tokens) and sends what extends the text already
    sent; a trailing U+FFFD (an incomplete UTF-8 sequence of a byte-level BPE) waits for the
    next token. Finished, it sends the rest, so the pieces add up to `decode(ids)`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sent = ""

    def delta(self, ids: list[int], final: bool = False) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece
