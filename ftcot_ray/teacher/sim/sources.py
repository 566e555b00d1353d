"""What teacher-sim answers with: replayed or simulated rationales, in the OpenAI response shapes.

* ``replay``: answers from recorded completions (the authors' ``D_*.json`` files or one of our
  completions tables). Step 1 is matched on the reasoning prompt, step 2 on the
  (reasoning prompt, rationale) pair, whatever answer trigger follows (MultiArith's file used
  " Therefore, the answer (arabic numerals) is"). Sample ``k`` of a prompt recorded ``m`` times
  is record ``k mod m``.
* ``simulated``: for the synthetic tasks (``Task.teacher_sim`` / ``Task.teacher_answer``) it writes
  a step-by-step rationale and reads its own answer back at step 2, wrong on purpose at
  ``error_rate``. Randomness is seeded from (sim seed, prompt, sample index, temperature); at
  temperature 0 the sample index is ignored, so every sample is the same (deterministic).

The sample index travels in the OpenAI ``seed`` request field (choice ``i`` of an ``n``-request
seeded ``s`` is sample ``s + i``); a request without ``seed`` gets a random sample.
Token counts are a word/punctuation regex count (`count_tokens`), not a real tokenizer; the cost
projection uses the same count for the sim, so its figures are exact here.

Nothing here knows about HTTP: `Responder.respond` turns a request body into a response body, for
the synchronous routes and for Batch API lines alike.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ...errors import ConfigError, InputFileError, InputMissing
from ...prompts import REASONING_TRIGGER

SIM_MODEL = "ftcot-sim-teacher"
MODEL_DESCRIPTION = (
    "ftcot-sim-teacher: a rule-based simulator for synthetic tasks / replay of recorded completions; "
    "not a language model"
)
STEP1_MARK = f"\nA: {REASONING_TRIGGER}"
ANSWER_MARK = "Therefore, the answer"
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


class BadRequest(ValueError):
    """The request cannot be answered (not a zero-shot-CoT prompt, unknown question): a 400."""


# --------------------------------------------------------------------------- text helpers


def count_tokens(text: str) -> int:
    """Words and punctuation marks: an approximation, honest about being one (no tokenizer here)."""
    return len(_TOKEN_RE.findall(text))


def chat_text(messages: list[dict]) -> str:
    """What the sim counts as a chat's prompt: the contents, joined by spaces."""
    return " ".join(str(m.get("content", "")) for m in messages)


def truncate_tokens(text: str, max_tokens: int) -> tuple[str, str]:
    """(text cut after `max_tokens` tokens, finish_reason): "length" when cut, like the API."""
    for i, m in enumerate(_TOKEN_RE.finditer(text)):
        if i == max_tokens:
            return text[: m.start()].rstrip(" "), "length"
    return text, "stop"


def parse_step(prompt: str) -> tuple[int, str, Optional[str]]:
    """(step, question, rationale) from a zero-shot-CoT completions prompt; ValueError otherwise."""
    if not prompt.startswith("Q: ") or STEP1_MARK not in prompt:
        raise ValueError("prompt is not of the form 'Q: ...\\nA: Let's think step by step.'")
    if prompt.endswith(STEP1_MARK):
        return 1, prompt[3 : -len(STEP1_MARK)], None
    head, _, rest = prompt.partition(STEP1_MARK)
    cut = rest.rfind(ANSWER_MARK)
    if cut < 0:
        raise ValueError(f"step-2 prompt has no {ANSWER_MARK!r} trigger")
    return 2, head[3:], rest[:cut].rstrip(" \n")


def parse_chat(messages: list[dict]) -> tuple[int, str, Optional[str]]:
    """The two-turn chat of `prompts.chat_messages` -> (step, question, rationale)."""
    if not messages or messages[0].get("role") != "user":
        raise ValueError("chat must start with the user's 'Q: ...' turn")
    step, question, _ = parse_step(str(messages[0].get("content", "")))
    if len(messages) == 1:
        return 1, question, None
    if len(messages) == 3 and messages[1].get("role") == "assistant" and ANSWER_MARK in str(messages[2].get("content")):
        return 2, question, str(messages[1].get("content", ""))
    raise ValueError("chat must be [user Q] (step 1) or [user Q, assistant rationale, user trigger] (step 2)")


def rng_for(*parts: Any) -> random.Random:
    h = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def prompt_digest(prompt: Any) -> str:
    blob = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- answer sources


class ReplayIndex:
    """Recorded completions, looked up by reasoning prompt (step 1) and (prompt, rationale) (step 2)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise InputMissing(f"teacher-sim replay file {self.path} not found")
        self.step1: dict[str, list[tuple[str, str]]] = {}
        self.step2: dict[tuple[str, str], str] = {}
        for idx, rp, rationale, finish, answer in sorted(self._records(), key=lambda r: r[0]):
            self.step1.setdefault(rp, []).append((rationale, finish))
            self.step2.setdefault((rp, rationale.strip()), answer)
        if not self.step1:
            raise InputFileError(f"{self.path}: no recorded completions to replay")

    def _records(self) -> Iterator[tuple]:
        if self.path.suffix == ".jsonl" or self.path.is_dir():  # a completions table, either form
            from ...tables import iter_table

            need = ("sample_index", "sample_idx", "reasoning_prompt", "rationale")
            for batch in iter_table(self.path, "completions", columns=need):
                for r in batch:
                    if r.get("error") is None and r.get("rationale") is not None:
                        yield ((r["sample_index"], r["sample_idx"]), r["reasoning_prompt"], r["rationale"],
                               r.get("finish_reason") or "stop", r.get("answer_completion") or "")
            return
        from ...io import read_json

        data = read_json(self.path)
        if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            raise InputFileError(f"{self.path}: expected the authors' format {{'metadata': ..., 'data': {{index: [...]}}}}")
        for items in data["data"].values():
            for c in items:
                yield ((c["sample_index"], c.get("completion_index", 0)), c["reasoning_prompt"],
                       c["reasoning_completion"], c.get("reasoning_finish_reason") or "stop", c["completion"])

    def answer(self, step: int, question: str, rationale: Optional[str], sample: int) -> tuple[str, str]:
        rp = f"Q: {question}{STEP1_MARK}"
        if step == 1:
            recs = self.step1.get(rp)
            if not recs:
                raise LookupError("replay: no recorded completion for this reasoning prompt")
            return recs[sample % len(recs)]
        ans = self.step2.get((rp, (rationale or "").strip()))
        if ans is None:
            raise LookupError("replay: no recorded answer for this (prompt, rationale)")
        return ans, "stop"


class Simulator:
    """Rule-based teacher for synthetic tasks: each registered task with `teacher_sim` is tried."""

    def __init__(self, error_rate: float, seed: int):
        self.error_rate, self.seed = error_rate, seed

    def answer(self, step: int, question: str, rationale: Optional[str], sample: int, temperature: float) -> tuple[str, str]:
        from ...tasks import synthetic_tasks

        tasks = synthetic_tasks()
        for task in tasks:
            if step == 1:
                rng = rng_for(self.seed, question, sample if temperature > 0 else 0, temperature)
                try:
                    text, _ = task.teacher_sim(question, rng, self.error_rate)
                except ValueError:
                    continue
                return " " + text.strip(), "stop"
            try:
                text = task.teacher_answer(question, rationale or "")
            except ValueError:
                continue
            return (text if text[:1].isspace() else " " + text), "stop"
        names = ", ".join(t.name for t in tasks) or "none registered"
        raise LookupError(
            f"simulated teacher only answers synthetic task questions ({names}); this one is not; use replay mode"
        )


# --------------------------------------------------------------------------- request body -> response body


class Responder:
    """A completions / chat request body -> (response body, the (prompt, sample) keys it answered)."""

    def __init__(self, settings: Any, model: str = SIM_MODEL):
        self.model = model
        if settings.mode == "replay" and not settings.replay_path:
            raise ConfigError("teacher-sim replay mode needs a replay path (teacher.sim.replay_path / --replay)")
        self.replay = ReplayIndex(settings.replay_path) if settings.mode == "replay" else None
        self.sim = Simulator(settings.error_rate, settings.seed)
        self.ids = 0

    @staticmethod
    def prompt_of(chat: bool, req: dict) -> Any:
        """The prompt (completions) or messages (chat) of a request; BadRequest when it has none."""
        try:
            prompt = req["messages"] if chat else req["prompt"]
        except (KeyError, TypeError):
            raise BadRequest(f"bad request: no {'messages' if chat else 'prompt'} field") from None
        if isinstance(prompt, list) and not chat:
            if len(prompt) != 1:
                raise BadRequest("bad request: one prompt per request")
            prompt = prompt[0]
        return prompt

    def respond(self, chat: bool, req: dict) -> tuple[dict, list[str], Any]:
        """(response body, answered keys "digest#sample", prompt); BadRequest for a 400."""
        prompt = self.prompt_of(chat, req)
        try:
            step, question, rationale = parse_chat(prompt) if chat else parse_step(prompt)
            n, temperature = int(req.get("n") or 1), float(req.get("temperature", 1.0) or 0.0)
            max_tokens = int(req.get("max_tokens") or 1 << 30)
        except (ValueError, TypeError, AttributeError) as e:
            raise BadRequest(f"bad request: {e}") from None
        seed = req.get("seed")
        first = int(seed) if seed is not None else random.randrange(1 << 30)
        try:
            choices = [self._choice(step, question, rationale, first + i, temperature, max_tokens, chat, i)
                       for i in range(n)]
        except LookupError as e:
            raise BadRequest(str(e)) from None
        digest = prompt_digest(prompt)
        return self._response(chat, req, prompt, choices), [f"{digest}#{first + i}" for i in range(n)], prompt

    def _choice(self, step, question, rationale, sample, temperature, max_tokens, chat, i) -> dict:
        if self.replay is not None:
            text, finish = self.replay.answer(step, question, rationale, sample)
        else:
            text, finish = self.sim.answer(step, question, rationale, sample, temperature)
        text, cut = truncate_tokens(text, max_tokens)
        finish = "length" if cut == "length" else finish
        if chat:
            return {"index": i, "message": {"role": "assistant", "content": text.strip()}, "finish_reason": finish}
        return {"index": i, "text": text, "finish_reason": finish, "logprobs": None}

    def _response(self, chat: bool, req: dict, prompt: Any, choices: list[dict]) -> dict:
        self.ids += 1
        ptoks = count_tokens(prompt if isinstance(prompt, str) else chat_text(prompt))
        ctoks = sum(count_tokens(c["message"]["content"] if chat else c["text"]) for c in choices)
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-sim{self.ids}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": req.get("model") or self.model,
            "choices": choices,
            "usage": {"prompt_tokens": ptoks, "completion_tokens": ctoks, "total_tokens": ptoks + ctoks},
        }


def error_body(message: str, etype: str = "invalid_request_error", code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}
