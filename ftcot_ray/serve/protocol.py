"""The OpenAI wire format: request checking, error bodies, responses and stream chunks.

Plain functions and pydantic models, no Ray and no HTTP framework, so every rule is unit-tested
alone. A request is checked in this order: the body (size, UTF-8, JSON, an object), then the
parameters this server refuses because they would change the answer silently (`stop`,
`logprobs`, tools, penalties, ...), then types and ranges (pydantic, strict: `"10"` is not an
integer), then rules between fields. Every failure is an `APIError` whose `param` names the field
and whose message says what was wrong and what is allowed: OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`.

Differences from OpenAI's defaults, on purpose: `temperature` defaults to 0 (greedy, as the
students are evaluated and as their exported generation_config says), and `n` > 1 needs a
temperature (greedy choices would all be equal). Extension: `"vote": true` adds the
self-consistency majority answer over the n choices (the vote `ftcot eval` takes).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Parameters OpenAI defines that this server does not implement. Sent with the value that means
# "off" they are accepted; any other value is refused rather than silently ignored.
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "stop": ((None, [], ""), "the student stops at its end-of-sequence token"),
    "logprobs": ((None, False, 0), "log-probabilities are not returned"),
    "top_logprobs": ((None, 0), "log-probabilities are not returned"),
    "logit_bias": ((None, {}), "logit bias is not supported"),
    "presence_penalty": ((None, 0, 0.0), "penalties are not supported"),
    "frequency_penalty": ((None, 0, 0.0), "penalties are not supported"),
    "repetition_penalty": ((None, 1, 1.0), "penalties are not supported"),
    "best_of": ((None, 1), "use n (and vote) instead"),
    "echo": ((None, False), "the prompt is not echoed"),
    "suffix": ((None, ""), "insertion is not supported"),
    "tools": ((None, []), "a student does not call tools"),
    "tool_choice": ((None, "none"), "a student does not call tools"),
    "functions": ((None, []), "a student does not call functions"),
    "function_call": ((None, "none"), "a student does not call functions"),
    "parallel_tool_calls": ((None, False), "a student does not call tools"),
    "response_format": ((None, {"type": "text"}), "only text output"),
    "audio": ((None,), "text only"),
    "modalities": ((None, ["text"]), "text only"),
    "prediction": ((None,), "predicted outputs are not supported"),
}
IGNORED = ("user", "metadata", "store", "service_tier")  # bookkeeping: never changes the answer


class APIError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --------------------------------------------------------------------------- the body


def parse_body(raw: bytes, max_bytes: int) -> dict:
    if len(raw) > max_bytes:
        raise APIError(413, f"request body is {len(raw)} bytes; this server accepts at most {max_bytes}",
                       code="request_too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})",
                       code="invalid_encoding") from None
    if not text.strip():
        raise APIError(400, "request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


# --------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's name; accepted, usage comes once at the end


class _Common(_Strict):
    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)  # None: 0 (greedy)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    vote: bool = False  # extension: the majority answer over the n choices


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]


def parse_request(body: dict, kind: Literal["chat", "completions"]) -> Union[ChatRequest, CompletionRequest]:
    body = dict(body)
    for name, (allowed, why) in UNSUPPORTED.items():
        if name in body:
            value = body.pop(name)
            if not any(value == a and type(value) is type(a) or value is a for a in allowed):
                raise APIError(400, f"{name}: not supported by this server ({why}); got {_short(value)}",
                               param=name, code="unsupported_parameter")
    for name in IGNORED:
        body.pop(name, None)
    model = ChatRequest if kind == "chat" else CompletionRequest
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise _from_validation(e) from None
    _check_rules(req)
    return req


def _check_rules(req) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options: only allowed with stream: true", param="stream_options",
                       code="invalid_value")
    if req.n > 1 and not (req.temperature or 0) > 0:
        raise APIError(400, f"n: n={req.n} choices need temperature > 0 (e.g. 0.7); greedy choices would all "
                       "be equal", param="n", code="invalid_value")
    if isinstance(req, ChatRequest):
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "max_completion_tokens: differs from max_tokens; send one of them",
                           param="max_completion_tokens", code="invalid_value")
    else:
        if isinstance(req.prompt, list) and len(req.prompt) != 1:
            raise APIError(400, f"prompt: send one question per request (got a list of {len(req.prompt)})",
                           param="prompt", code="invalid_value")


def _from_validation(err: ValidationError) -> APIError:
    e = err.errors()[0]
    loc = [x for x in e["loc"] if not (isinstance(x, str) and x in ("str", "list[TextPart]", "list[str]"))]
    param = _param(loc)
    kind, msg = e["type"], e["msg"]
    if kind == "extra_forbidden":
        return APIError(400, f"{param}: unknown parameter", param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"{param}: missing required parameter", param=param, code="missing_required_parameter")
    code = "invalid_type" if kind.endswith("_type") or kind.endswith("_parsing") or "type" in kind else "invalid_value"
    return APIError(400, f"{param}: {msg} (got {_short(e.get('input'))})", param=param, code=code)


def _param(loc: list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def question_of(req: Union[ChatRequest, CompletionRequest]) -> tuple[str, str]:
    """(the plain question, the param that holds it). A student answers one question: the last
    message must be the user's, and before it only system/developer messages (ignored: the
    students were trained without one)."""
    if isinstance(req, CompletionRequest):
        text, param = (req.prompt[0], "prompt[0]") if isinstance(req.prompt, list) else (req.prompt, "prompt")
    else:
        roles = [m.role for m in req.messages]
        last = len(roles) - 1
        if roles[-1] != "user" or any(r not in ("system", "developer") for r in roles[:-1]):
            raise APIError(400, f"messages: a student answers one question: send one user message (after optional "
                           f"system messages) as the last message; got roles {roles}", param="messages",
                           code="invalid_value")
        content = req.messages[-1].content
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        param = f"messages[{last}].content"
    if not text.strip():
        raise APIError(400, f"{param}: the question is empty", param=param, code="invalid_value")
    return text, param


# --------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_choice(index: int, reasoning: Optional[str], answer: Optional[str], finish_reason: str) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": answer, "reasoning": reasoning,
                                        "reasoning_content": reasoning},
            "logprobs": None, "finish_reason": finish_reason}


def completion_choice(index: int, text: str, answer: Optional[str], finish_reason: Optional[str]) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, "answer": answer}


def response(kind: str, rid: str, created: int, model: str, choices: list[dict], use: dict,
             vote: Optional[dict] = None) -> dict:
    out = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
           "model": model, "choices": choices, "usage": use}
    if vote is not None:
        out["vote"] = vote
    return out


def chunk(kind: str, rid: str, created: int, model: str, choices: list[dict], include_usage: bool,
          **extra: Any) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "created": created,
           "model": model, "choices": choices}
    if include_usage:
        out["usage"] = extra.pop("usage", None)
    out.update(extra)
    return out


def chat_delta(index: int, finish_reason: Optional[str] = None, **delta: Any) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def vote_summary(answers: list[Optional[str]], rules) -> dict:
    """The self-consistency vote over the choices' answers (`evaluation.majority_vote`)."""
    from ..evaluation import majority_vote
    from ..tasks.answers import is_correct

    winner = majority_vote(answers, rules)
    # Votes for the winner, compared as the task compares answers (6 and 6.0 are one number).
    count = 0 if winner is None else sum(is_correct(rules, a, winner) for a in answers)
    return {"answer": winner, "count": count, "n": len(answers), "answers": answers}


def sse(obj: Union[dict, str]) -> bytes:
    """One server-sent event: `data: <one JSON object>` and a blank line (`[DONE]` as is)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
