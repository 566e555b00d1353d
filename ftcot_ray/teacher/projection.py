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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ConfigError
from ..prompts import ANSWER_TRIGGER
from .answers import AnswerIndex
from .spec import RequestSpec

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


@dataclass
class Moments:
    """Count, sum and sum of squares of observed completion tokens: partial tallies add up."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, x: float) -> None:
        self.n, self.total, self.squares = self.n + 1, self.total + x, self.squares + x * x


# Partial tallies are flat dicts of numbers, so batches tallied anywhere add up on the driver.
FIGURES = ("s1_requests", "s1_samples", "s1_prompt_low", "s1_prompt_high", "s1_completion_high",
           "s2_requests", "s2_samples", "s2_prompt_low", "s2_prompt_high", "s2_completion_high",
           "cached_rows", "unknown", "cached_usd", "seen1_n", "seen1_sum", "seen1_sq", "seen2_n", "seen2_sum", "seen2_sq")


def tally_questions(questions: list[str], spec: RequestSpec, d: int, index: Optional[AnswerIndex],
                    counter: TokenCounter) -> dict:
    """Requests and token ranges for samples 0..d-1 of `questions`, as the fan-out will ask them (stored
    answers first, grouped by `RequestSpec.groups`): a partial tally (FIGURES)."""
    out = dict.fromkeys(FIGURES, 0.0)
    trigger = counter.count(ANSWER_TRIGGER) + (4 if counter.chat_overhead else 0)
    seen1, seen2 = Moments(), Moments()
    keys1 = [[spec.step1_key(q, i) for i in range(d)] for q in questions]
    hits1 = index.get_many([k for ks in keys1 for k in ks]) if index is not None and len(index) else {}
    for q, ks in zip(questions, keys1):
        p1_tokens = counter.prompt(spec.payload(q))
        missing = []
        pending2 = []
        for i, k1 in enumerate(ks):
            hit = hits1.get(k1)
            if hit is None:
                missing.append(i)
                out["unknown"] += 1
                out["s2_requests"] += 1
                out["s2_samples"] += 1
                out["s2_prompt_low"] += p1_tokens + trigger
                out["s2_prompt_high"] += p1_tokens + trigger + spec.max_tokens
                out["s2_completion_high"] += spec.answer_max_tokens
                continue
            if hit.get("completion_tokens") is not None:
                seen1.add(int(hit["completion_tokens"]))
            out["cached_usd"] += hit.get("cost_usd") or 0.0
            pending2.append((i, hit["text"]))
        keys2 = [spec.step2_key(q, text, i) for i, text in pending2]
        hits2 = index.get_many(keys2) if keys2 else {}
        for (i, text), k2 in zip(pending2, keys2):
            hit = hits2.get(k2)
            if hit is None:
                out["s2_requests"] += 1
                out["s2_samples"] += 1
                exact = counter.prompt(spec.payload(q, text))
                out["s2_prompt_low"] += exact
                out["s2_prompt_high"] += exact
                out["s2_completion_high"] += spec.answer_max_tokens
            else:
                out["cached_rows"] += 1
                out["cached_usd"] += hit.get("cost_usd") or 0.0
                if hit.get("completion_tokens") is not None:
                    seen2.add(int(hit["completion_tokens"]))
        if missing:
            for g in spec.groups(missing, 1):
                out["s1_requests"] += 1
                out["s1_samples"] += len(g)
                out["s1_prompt_low"] += p1_tokens
                out["s1_prompt_high"] += p1_tokens
                out["s1_completion_high"] += spec.max_tokens * len(g)
    for name, m in (("seen1", seen1), ("seen2", seen2)):
        out[f"{name}_n"], out[f"{name}_sum"], out[f"{name}_sq"] = m.n, m.total, m.squares
    return out


def add_tallies(parts: list[dict]) -> dict:
    return {k: sum(p.get(k, 0.0) for p in parts) for k in FIGURES}


def _expect(r: Range, seen: Moments, n: float, offset: float = 0.0) -> None:
    """Mean and a 3-sigma band for a sum of `n` samples like the `seen` ones (plus a fixed offset)."""
    if not seen.n or n == 0:
        if n == 0:
            r.expected, r.band = offset, (offset, offset)
        return
    mean = seen.total / seen.n
    sd = math.sqrt(max(0.0, seen.squares / seen.n - mean * mean)) if seen.n > 1 else mean
    r.expected = offset + mean * n
    half = 3 * sd * math.sqrt(n)
    r.band = (max(r.low, r.expected - half), min(r.high, r.expected + half))


def steps_of(t: dict) -> tuple[StepTally, StepTally]:
    """The two steps' tallies (with expected figures) from a summed partial tally."""
    s1 = StepTally(int(t["s1_requests"]), int(t["s1_samples"]), Range(t["s1_prompt_low"], t["s1_prompt_high"]),
                   Range(0, t["s1_completion_high"]))
    s2 = StepTally(int(t["s2_requests"]), int(t["s2_samples"]), Range(t["s2_prompt_low"], t["s2_prompt_high"]),
                   Range(0, t["s2_completion_high"]))
    seen1 = Moments(int(t["seen1_n"]), t["seen1_sum"], t["seen1_sq"])
    seen2 = Moments(int(t["seen2_n"]), t["seen2_sum"], t["seen2_sq"])
    s1.prompt.expected, s1.prompt.band = s1.prompt.low, (s1.prompt.low, s1.prompt.high)  # known before any call
    _expect(s1.completion, seen1, s1.samples)
    _expect(s2.completion, seen2, s2.samples)
    # A step-2 prompt is its fixed part plus the rationale it carries (about a step-1 completion's tokens).
    _expect(s2.prompt, seen1, t["unknown"], offset=s2.prompt.low)
    return s1, s2


def price_of(tcfg: Any) -> tuple[tuple[float, float], Optional[str]]:
    """(USD per input token, per output token), and a note when the model has no price."""
    price = tcfg.prices.get(tcfg.model)
    if price is None:
        return (0.0, 0.0), f"no teacher.prices entry for {tcfg.model!r}: dollars shown as 0"
    return price.per_token(tcfg.mode), None


class TallyBatch:
    """A Ray Data map: each batch of questions -> one row holding its partial tally for every D (JSON)."""

    def __init__(self, tcfg: dict, endpoint_id: str, diversities: list[int], index: list):
        import ray

        from ..config import TeacherConfig

        t = TeacherConfig.model_validate(tcfg)
        self.spec, self.diversities, self.counter = RequestSpec.of(t, endpoint_id), diversities, token_counter(t)
        self.index = ray.get(index[0]) if index and index[0] is not None else None

    def __call__(self, batch: dict) -> dict:
        import json

        questions = [str(q) for q in batch["question"]]
        parts = {d: tally_questions(questions, self.spec, d, self.index, self.counter) for d in self.diversities}
        return {"tally": [json.dumps({"n": len(questions), "longest": max(map(len, questions), default=0),
                                      "by_D": parts})]}


def tally(questions, tcfg: Any, endpoint_id: str, index_ref: Any, diversities: list[int]) -> dict:
    """Summed tallies for each D over a Ray Dataset of questions: {"n", "longest", "by_D": {D: tally}}."""
    import json

    import ray

    ds = questions.select_columns(["question"]).map_batches(
        TallyBatch, fn_constructor_kwargs={"tcfg": tcfg.model_dump(mode="json"), "endpoint_id": endpoint_id,
                                           "diversities": diversities, "index": [index_ref]},
        batch_size=2048, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    parts = [json.loads(r["tally"]) for r in ds.take_all()]  # one small row per batch
    return {"n": sum(p["n"] for p in parts), "longest": max((p["longest"] for p in parts), default=0),
            "by_D": {d: add_tallies([p["by_D"][str(d)] for p in parts]) for d in diversities}}


def project(tallies: dict, tcfg: Any, counter: Optional[TokenCounter] = None) -> dict:
    """The projection for D_max and each D of a `tally` (rows with sample_idx < D)."""
    counter = counter or token_counter(tcfg)
    (pin, pout), note = price_of(tcfg)
    by_d = []
    for d, t in sorted(tallies["by_D"].items()):
        s1, s2 = steps_of(t)
        prompt, completion = _sum(s1.prompt, s2.prompt), _sum(s1.completion, s2.completion)
        usd = Range(prompt.low * pin + completion.low * pout, prompt.high * pin + completion.high * pout)
        if prompt.expected is not None and completion.expected is not None:
            usd.expected = prompt.expected * pin + completion.expected * pout
            usd.band = (prompt.band[0] * pin + completion.band[0] * pout, prompt.band[1] * pin + completion.band[1] * pout)
        by_d.append({
            "D": d, "rows": tallies["n"] * d, "cached_rows": int(t["cached_rows"]),
            "requests": {"step1": s1.requests, "step2": s2.requests, "total": s1.requests + s2.requests},
            "prompt_tokens": {"step1": s1.prompt.to_json(), "step2": s2.prompt.to_json(), "total": prompt.to_json()},
            "completion_tokens": {"step1": s1.completion.to_json(), "step2": s2.completion.to_json(),
                                  "total": completion.to_json()},
            "usd": usd.to_json(), "observed_samples": int(t["seen1_n"]), "cached_usd": round(t["cached_usd"], 6),
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
