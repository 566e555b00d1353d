"""One teacher request spec: what is sent for a question, with which sampling parameters, under which
cache key, and how samples are grouped into requests.

Built once from the config (`RequestSpec.of`) and used by every path that asks or counts: the Ray
Data fan-out, the Batch API mode and the dry-run projection. The projection's promise to equal the
run rests on that: a key, a payload or a grouping is made here and nowhere else.

A cache key is the sha256 of (endpoint, api, model, prompt or messages, sampling parameters, sample
index). Nothing about curation or answer rules goes in, so changing those never invalidates a paid
answer; the material is the one of caches written before the spec (version 1), so their keys still match.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from ..prompts import answer_prompt, chat_messages, reasoning_prompt

CACHE_VERSION = 1


def request_key(endpoint: str, api: str, model: str, prompt: Any, params: dict, sample_idx: int) -> str:
    """The cache key of one sample of one request. `params`: temperature, top_p, max_tokens."""
    material = {
        "v": CACHE_VERSION,
        "endpoint": endpoint,
        "api": api,
        "model": model,
        "prompt": prompt,
        "params": {k: params[k] for k in sorted(params)},
        "sample": int(sample_idx),
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class RequestSpec:
    endpoint_id: str
    api: str
    model: str
    temperature: float
    top_p: float
    max_tokens: int  # step 1: the rationale
    answer_max_tokens: int  # step 2: the answer
    use_n: bool
    seed_param: bool

    @classmethod
    def of(cls, tcfg: Any, endpoint_id: str) -> "RequestSpec":
        return cls(endpoint_id=endpoint_id, api=tcfg.api, model=tcfg.model, temperature=tcfg.temperature,
                   top_p=tcfg.top_p, max_tokens=tcfg.max_tokens, answer_max_tokens=tcfg.answer_max_tokens,
                   use_n=tcfg.use_n, seed_param=tcfg.seed_param)

    # ------------------------------------------------------------------ what is sent

    def payload(self, question: str, rationale: Optional[str] = None) -> Any:
        """Step 1 (rationale None) or step 2: a completions prompt, or the paper's two-turn chat."""
        if self.api == "chat":
            return chat_messages(question, rationale)
        return reasoning_prompt(question) if rationale is None else answer_prompt(question, rationale)

    def max_tokens_of(self, step: int) -> int:
        return self.max_tokens if step == 1 else self.answer_max_tokens

    def params(self, step: int) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens_of(step)}

    def seed(self, samples: list[int]) -> Optional[int]:
        """The OpenAI `seed` of a request for `samples`: the first sample (choice i is sample seed + i)."""
        return samples[0] if self.seed_param else None

    # ------------------------------------------------------------------ keys

    def key(self, payload: Any, step: int, sample: int) -> str:
        return request_key(self.endpoint_id, self.api, self.model, payload, self.params(step), sample)

    def step1_key(self, question: str, sample: int) -> str:
        return self.key(self.payload(question), 1, sample)

    def step2_key(self, question: str, rationale: str, sample: int) -> str:
        return self.key(self.payload(question, rationale), 2, sample)

    # ------------------------------------------------------------------ grouping

    def groups(self, samples: list[int], step: int) -> list[list[int]]:
        """Requests for the missing `samples` of one prompt: with `use_n`, one `n`-request when they are
        contiguous (step 1: every sample shares the prompt); one request per sample otherwise."""
        contiguous = samples == list(range(samples[0], samples[0] + len(samples))) if samples else False
        if step == 1 and self.use_n and len(samples) > 1 and contiguous:
            return [list(samples)]
        return [[s] for s in samples]

    # ------------------------------------------------------------------ ceilings (budget, rate limits)

    def ceilings(self, longest_question_chars: int) -> tuple[int, int]:
        """(prompt tokens, completion tokens) one request can reach at most: the step-2 prompt holds the
        question and a whole rationale; about 3 characters a token, rounded up (a ceiling, not an estimate)."""
        prompt = math.ceil((longest_question_chars + 60) / 3) + self.max_tokens * 2
        return prompt, max(self.max_tokens, self.answer_max_tokens)

    def estimate_tokens(self, payload: Any, step: int, expected_completion: Optional[float] = None) -> float:
        """What a request will most likely cost in tokens, for the TPM gate at send time (corrected by
        the usage the response reports): about 4 characters a prompt token, and the completion's
        running mean (its max_tokens until one has come back)."""
        text = payload if isinstance(payload, str) else "".join(str(m.get("content", "")) for m in payload)
        completion = expected_completion if expected_completion is not None else self.max_tokens_of(step)
        return len(text) / 4 + min(completion, self.max_tokens_of(step))
