"""A step-at-a-time decoding loop for a batch of rows (one row = one choice of one request).

Why not `model.generate`: a server batch mixes requests that each have their own `max_tokens`,
temperature, `top_p` and seed, and streams every row's tokens as they come. `generate` takes
one set of parameters for the whole batch, streams only batch-of-one (its streamers), and draws
every row's sample from one random stream, so a request's sample would depend on who shared its
batch. The loop below is the same greedy / nucleus decoding `ftcot eval` does (left padding
with position ids from the attention mask, as `generate` builds them; the KV cache; stop at
EOS), with per-row limits, per-row seeded generators, and rows dropped from the batch (cache
included) as soon as they finish. Greedy output in a batch equals output alone (tested against
`student.generate.generate_one`, the reference `ftcot eval` is tested against too).

`step_states` is a plain generator: each `next()` runs one forward pass (prefill first) and
returns the new token of every row, or None for a row that is already done. The server runs
each step in a worker thread so its event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from ..student.generate import Student


@dataclass
class RowSpec:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None  # sampling only; None: a fresh random seed


@dataclass
class RowState:
    spec: RowSpec
    ids: list[int] = field(default_factory=list)  # generated ids, EOS included when it came
    finish_reason: Optional[str] = None  # "stop" (EOS) | "length" (max_new_tokens) | None: running
    generator: Optional[torch.Generator] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def new_states(rows: Sequence[RowSpec]) -> list[RowState]:
    out = []
    for spec in rows:
        gen = None
        if spec.temperature > 0:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(spec.seed if spec.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        out.append(RowState(spec=spec, generator=gen))
    return out


@torch.no_grad()
def step_states(student: Student, states: list[RowState]) -> Iterator[list[Optional[int]]]:
    """The loop itself, over states the caller keeps (to read `ids` / `finish_reason` at any time)."""
    if not states:
        return
    model, tok = student.model, student.tokenizer
    device = next(model.parameters()).device
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    active = list(range(len(states)))  # batch position -> row index
    prompts = [s.spec.prompt_ids for s in states]
    width = max(len(p) for p in prompts)
    if student.family == "decoder":
        # Left padding: every row's next token follows its own last prompt token.
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        positions = mask.long().cumsum(-1) - 1
        positions.masked_fill_(mask == 0, 1)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **_last_logits_only(model))
        enc_out, enc_mask = None, None
    else:
        input_ids = torch.tensor([list(p) + [pad] * (width - len(p)) for p in prompts], device=device)
        enc_mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], device=device)
        enc_out = model.get_encoder()(input_ids=input_ids, attention_mask=enc_mask)
        start = model.config.decoder_start_token_id
        start = pad if start is None else start
        dec = torch.full((len(prompts), 1), start, dtype=torch.long, device=device)
        out = model(encoder_outputs=enc_out, attention_mask=enc_mask, decoder_input_ids=dec, use_cache=True)
        mask = None
    cache_kw = _cache_kwarg(model)
    cache = _cache_of(out)
    logits = out.logits[:, -1, :]
    while True:
        new = _pick(logits, [states[i] for i in active])
        result: list[Optional[int]] = [None] * len(states)
        for b, i in enumerate(active):
            s, t = states[i], int(new[b])
            if s.done:  # finished from outside (the request went away) before this token
                continue
            s.ids.append(t)
            result[i] = t
            if t == eos:
                s.finish_reason = "stop"
            elif len(s.ids) >= s.spec.max_new_tokens:
                s.finish_reason = "length"
        yield result
        # Read after the yield: the caller may finish rows meanwhile (`abort`), and they go too.
        keep = [b for b, i in enumerate(active) if not states[i].done]
        if not keep:
            return
        if len(keep) < len(active):  # drop finished rows: later steps compute only the live ones
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            new = new[idx]
            active = [active[b] for b in keep]
            if mask is not None:
                mask = mask[idx]
            if enc_out is not None:
                enc_out.last_hidden_state = enc_out.last_hidden_state[idx]
                enc_mask = enc_mask[idx]
        step_ids = new.view(-1, 1)
        if student.family == "decoder":
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            pos = (mask.long().sum(-1, keepdim=True) - 1)
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        **{cache_kw: cache})
        else:
            out = model(encoder_outputs=enc_out, attention_mask=enc_mask, decoder_input_ids=step_ids,
                        use_cache=True, **{cache_kw: cache})
        cache = _cache_of(out)
        logits = out.logits[:, -1, :]


def _params(model) -> set:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _cache_kwarg(model) -> str:
    # transformers renamed `past_key_values` to `cache` within 5.x; accept both spellings.
    return "cache" if "cache" in _params(model) else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _last_logits_only(model) -> dict:
    """Prefill computes the LM head on the last position only, where the model supports it."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _params(model) else {}


def _pick(logits: torch.Tensor, states: list[RowState]) -> torch.Tensor:
    """Greedy rows: argmax. Sampled rows: temperature, nucleus (top_p), then a draw from the row's
    own generator (top_k off, as `ftcot eval` samples)."""
    picks = torch.argmax(logits, dim=-1)
    for b, s in enumerate(states):
        if s.spec.temperature <= 0:
            continue
        row = logits[b].float().cpu() / s.spec.temperature
        if s.spec.top_p < 1.0:
            row = _top_p(row, s.spec.top_p)
        probs = torch.softmax(row, dim=-1)
        picks[b] = int(torch.multinomial(probs, 1, generator=s.generator))
    return picks


def _top_p(row: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    sorted_logits, order = torch.sort(row, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # tokens after the set is already full
    drop[0] = False
    out = row.clone()
    out[order[drop]] = float("-inf")
    return out


def abort(states: Sequence[RowState]) -> None:
    """Finish rows whose request went away; the loop drops them before its next step."""
    for s in states:
        if not s.done:
            s.finish_reason = "abort"


def run_rows(student: Student, rows: Sequence[RowSpec]) -> list[RowState]:
    """Decode to the end (tests, benchmarks): the finished states, in the rows' order."""
    states = new_states(rows)
    for _ in step_states(student, states):
        pass
    return states
