"""What the teacher stage will send and cost, before the first paid call.

For the rows a run asks (D_max samples per question, and each smaller D the run curates): requests
per step, prompt tokens, a completion-token range and dollars at `teacher.prices` (the Batch API's
rate with `teacher.mode=batch`). Answers already in the cache are free and not counted, exactly
as the run will skip them.

* Step-1 prompts are known, so their tokens are exact where a tokenizer for the model is at hand:
  teacher-sim's own count for the sim, or `teacher.tokenizer` (a tokenizer.json, or a folder
  holding one). Otherwise they are an estimate (about 4 characters a token) and say so.
* A step-2 prompt holds its rationale, unknown before step 1: it is a range, from the prompt
  without the rationale up to one with a rationale of `teacher.max_tokens` tokens.
* Completions: from 0 to the `max_tokens` ceilings; with answered samples at hand (a paid pilot,
  `teacher.pilot=N`, or the cache) also an expected figure, their mean, and a band of three
  standard deviations of a sum, clipped to the ceiling range.

The paper's chat variant counts message contents only with the sim; a tokenizer adds OpenAI's
documented overhead of 4 tokens a message plus 3 a reply (approximate, and labelled so).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ConfigError
from ..prompts import ANSWER_TRIGGER
from .cache import AnswerCache, request_key
from .fanout import payloads

CHARS_PER_TOKEN = 4


# --------------------------------------------------------------------------- counting tokens


@dataclass
class TokenCounter:
    count: Callable[[str], int]
    label: str
    exact: bool
    chat_overhead: bool = False  # add OpenAI's per-message overhead (a real tokenizer on the chat API)

    def prompt(self, payload: Any) -> int:
        """Tokens of a completions prompt or a chat's messages."""
        if isinstance(payload, str):
            return self.count(payload)
        if not self.chat_overhead:  # teacher-sim: the contents joined by spaces
            from .sim.sources import chat_text

            return self.count(chat_text(payload))
        return sum(self.count(str(m.get("content", ""))) + 4 for m in payload) + 3


def token_counter(tcfg: Any) -> TokenCounter:
    """The best counter at hand for the teacher's model (see the module docstring)."""
    from .sim.sources import SIM_MODEL, count_tokens

    chat = tcfg.api == "chat"
    choice = tcfg.tokenizer
    if choice == "sim" or (choice is None and (tcfg.base_url is None or tcfg.model == SIM_MODEL)):
        return TokenCounter(count_tokens, "exact (teacher-sim's word/punctuation count)", True)
    if choice:
        path = Path(choice)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"teacher.tokenizer={choice}: no tokenizer.json there (a tokenizer.json file, or a folder "
                              "holding one; or 'sim')")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(file))
        label = f"exact ({file})" + (" + OpenAI's per-message chat overhead (approximate)" if chat else "")
        return TokenCounter(lambda text: len(tok.encode(text, add_special_tokens=False).ids), label, not chat, chat)
    return TokenCounter(lambda text: math.ceil(len(text) / CHARS_PER_TOKEN),
                        f"estimate (about {CHARS_PER_TOKEN} characters a token; set teacher.tokenizer for exact counts)",
                        False, chat)


# --------------------------------------------------------------------------- the projection


@dataclass
class Range:
    low: float = 0
    high: float = 0
    expected: Optional[float] = None
    band: Optional[tuple[float, float]] = None

    def add(self, low: float, high: float) -> None:
        self.low += low
        self.high += high

    def to_json(self) -> dict:
        out: dict[str, Any] = {"low": round(self.low, 6), "high": round(self.high, 6)}
        if self.expected is not None:
            out["expected"] = round(self.expected, 6)
            out["band"] = [round(x, 6) for x in self.band]
        return out


@dataclass
class StepTally:
    requests: int = 0
    samples: int = 0  # samples asked (with `use_n` one request asks for several)
    prompt: Range = field(default_factory=Range)
    completion: Range = field(default_factory=Range)


def observed(cache: AnswerCache, keys: list[str]) -> list[int]:
    """Completion tokens of the answered samples among `keys` (pilot and earlier runs)."""
    out = []
    for k in keys:
        hit = cache.get(k)
        if hit is not None and hit.get("completion_tokens") is not None:
            out.append(int(hit["completion_tokens"]))
    return out


def _expect(r: Range, per_sample: list[int], n: int, offset: float = 0.0) -> None:
    """Mean and a 3-sigma band for a sum of `n` samples like `per_sample` (plus a fixed offset)."""
    if not per_sample or n == 0:
        if n == 0:
            r.expected, r.band = offset, (offset, offset)
        return
    mean = statistics.fmean(per_sample)
    sd = statistics.pstdev(per_sample) if len(per_sample) > 1 else mean
    r.expected = offset + mean * n
    half = 3 * sd * math.sqrt(n)
    r.band = (max(r.low, r.expected - half), min(r.high, r.expected + half))


def tally(rows: list[dict], tcfg: Any, endpoint_id: str, cache: AnswerCache, counter: TokenCounter) -> dict:
    """Requests and token ranges for `rows`, as `answer_question` will ask them (cache first)."""
    t = tcfg

    def key(payload: Any, max_tokens: int, sample: int) -> str:
        params = {"temperature": t.temperature, "top_p": t.top_p, "max_tokens": max_tokens}
        return request_key(endpoint_id, t.api, t.model, payload, params, sample)

    s1, s2 = StepTally(), StepTally()
    trigger = counter.count(ANSWER_TRIGGER) + (4 if counter.chat_overhead else 0)
    by_q: dict[int, list[dict]] = {}
    for r in rows:
        by_q.setdefault(r["sample_index"], []).append(r)
    s1_keys, s2_keys, cached_rows, unknown = [], [], 0, 0  # unknown: step-2 prompts whose rationale is to come
    for group in by_q.values():
        q = group[0]["question"]
        p1 = payloads(t.api, q)
        p1_tokens = counter.prompt(p1)
        missing = []
        for r in sorted(group, key=lambda r: r["sample_idx"]):
            k1 = key(p1, t.max_tokens, r["sample_idx"])
            s1_keys.append(k1)
            hit = cache.get(k1)
            if hit is None:
                missing.append(r["sample_idx"])
                unknown += 1
                s2.requests += 1
                s2.samples += 1
                s2.prompt.add(p1_tokens + trigger, p1_tokens + trigger + t.max_tokens)
                s2.completion.add(0, t.answer_max_tokens)
                continue
            p2 = payloads(t.api, q, hit["text"])
            k2 = key(p2, t.answer_max_tokens, r["sample_idx"])
            s2_keys.append(k2)
            if cache.get(k2) is None:
                s2.requests += 1
                s2.samples += 1
                exact = counter.prompt(p2)
                s2.prompt.add(exact, exact)
                s2.completion.add(0, t.answer_max_tokens)
            else:
                cached_rows += 1
        if missing:
            contiguous = missing == list(range(missing[0], missing[0] + len(missing)))
            groups = [missing] if t.use_n and len(missing) > 1 and contiguous else [[s] for s in missing]
            for g in groups:
                s1.requests += 1
                s1.samples += len(g)
                s1.prompt.add(p1_tokens, p1_tokens)
                s1.completion.add(0, t.max_tokens * len(g))
    seen1, seen2 = observed(cache, s1_keys), observed(cache, s2_keys)
    s1.prompt.expected, s1.prompt.band = s1.prompt.low, (s1.prompt.low, s1.prompt.high)  # known before any call
    _expect(s1.completion, seen1, s1.samples)
    _expect(s2.completion, seen2, s2.samples)
    # A step-2 prompt is its fixed part plus the rationale it carries (about a step-1 completion's tokens).
    _expect(s2.prompt, seen1, unknown, offset=s2.prompt.low)
    return {"steps": (s1, s2), "cached_rows": cached_rows, "observed_samples": len(seen1)}


def price_of(tcfg: Any) -> tuple[tuple[float, float], Optional[str]]:
    """(USD per input token, per output token), and a note when the model has no price."""
    price = tcfg.prices.get(tcfg.model)
    if price is None:
        return (0.0, 0.0), f"no teacher.prices entry for {tcfg.model!r}: dollars shown as 0"
    return price.per_token(tcfg.mode), None


def project(rows: list[dict], tcfg: Any, endpoint_id: str, cache: AnswerCache, diversities: list[int],
            counter: Optional[TokenCounter] = None) -> dict:
    """The projection for D_max and each D in `diversities` (rows with sample_idx < D)."""
    counter = counter or token_counter(tcfg)
    (pin, pout), note = price_of(tcfg)
    by_d = []
    for d in sorted({min(x, tcfg.samples) for x in diversities} | {tcfg.samples}):
        sub = [r for r in rows if r["sample_idx"] < d]
        res = tally(sub, tcfg, endpoint_id, cache, counter)
        s1, s2 = res["steps"]
        prompt, completion = _sum(s1.prompt, s2.prompt), _sum(s1.completion, s2.completion)
        usd = Range(prompt.low * pin + completion.low * pout, prompt.high * pin + completion.high * pout)
        if prompt.expected is not None and completion.expected is not None:
            usd.expected = prompt.expected * pin + completion.expected * pout
            usd.band = (prompt.band[0] * pin + completion.band[0] * pout, prompt.band[1] * pin + completion.band[1] * pout)
        by_d.append({
            "D": d, "rows": len(sub), "cached_rows": res["cached_rows"],
            "requests": {"step1": s1.requests, "step2": s2.requests, "total": s1.requests + s2.requests},
            "prompt_tokens": {"step1": s1.prompt.to_json(), "step2": s2.prompt.to_json(), "total": prompt.to_json()},
            "completion_tokens": {"step1": s1.completion.to_json(), "step2": s2.completion.to_json(),
                                  "total": completion.to_json()},
            "usd": usd.to_json(), "observed_samples": res["observed_samples"],
        })
    out = {"mode": tcfg.mode, "model": tcfg.model, "tokenizer": counter.label, "prompt_tokens_exact": counter.exact,
           "price_per_1m": {"input": pin * 1e6, "output": pout * 1e6}, "by_D": by_d}
    if note:
        out["note"] = note
    return out


def _sum(a: Range, b: Range) -> Range:
    r = Range(a.low + b.low, a.high + b.high)
    if a.expected is not None and b.expected is not None:  # else no expected figure for the sum
        r.expected, r.band = a.expected + b.expected, (a.band[0] + b.band[0], a.band[1] + b.band[1])
    return r


def actual(stats: dict, tcfg: Any) -> dict:
    """The same figures from a run's counters, for the summary's projected-vs-actual."""
    (pin, pout), _ = price_of(tcfg)
    return {
        "requests": {"step1": stats.get("step1_requests", 0), "step2": stats.get("step2_requests", 0),
                     "total": stats.get("step1_requests", 0) + stats.get("step2_requests", 0)},
        "prompt_tokens": {"step1": stats.get("step1_prompt_tokens", 0), "step2": stats.get("step2_prompt_tokens", 0),
                          "total": stats.get("prompt_tokens", 0)},
        "completion_tokens": {"step1": stats.get("step1_completion_tokens", 0),
                              "step2": stats.get("step2_completion_tokens", 0),
                              "total": stats.get("completion_tokens", 0)},
        "usd": round(stats.get("cost_usd", 0.0), 6),
    }


# --------------------------------------------------------------------------- for people


def _fmt_range(r: dict, money: bool = False) -> str:
    f = (lambda x: f"${x:,.4f}") if money else (lambda x: f"{x:,.0f}")
    text = f(r["low"]) if r["low"] == r["high"] else f"{f(r['low'])}–{f(r['high'])}"
    if r.get("expected") is not None:
        text += f" (expected {f(r['expected'])}, likely {f(r['band'][0])}–{f(r['band'][1])})"
    return text


def format_projection(p: dict, actual_figures: Optional[dict] = None) -> str:
    """Lines for the terminal: one block per D, and the actual figures of a run beside D_max's."""
    head = (f"teacher projection ({p['mode']}, {p['model']}, ${p['price_per_1m']['input']:g}/"
            f"${p['price_per_1m']['output']:g} per 1M tokens in/out); prompt tokens: {p['tokenizer']}")
    lines = [head]
    if p.get("note"):
        lines.append(f"  note: {p['note']}")
    if p.get("pilot"):
        pl = p["pilot"]
        lines.append(f"  pilot: {pl['questions']} questions answered for real ({pl['rows']} rows, ${pl['cost_usd']:.4f})")
    for d in p["by_D"]:
        lines.append(f"  D={d['D']}: {d['rows']} rows ({d['cached_rows']} cached, free): "
                     f"requests {d['requests']['step1']} + {d['requests']['step2']} (step 1 + 2)")
        lines.append(f"    prompt tokens {_fmt_range(d['prompt_tokens']['total'])}; completion tokens "
                     f"{_fmt_range(d['completion_tokens']['total'])}; cost {_fmt_range(d['usd'], money=True)}")
    if actual_figures is not None:
        a = actual_figures
        lines.append(f"  actual: requests {a['requests']['step1']} + {a['requests']['step2']}; prompt tokens "
                     f"{a['prompt_tokens']['total']:,}; completion tokens {a['completion_tokens']['total']:,}; "
                     f"cost ${a['usd']:.4f}")
    return "\n".join(lines)
