"""The HTTP ingress: OpenAI routes in front of one StudentServer deployment per model id.

    POST /v1/chat/completions   POST /v1/completions   (stream: true -> server-sent events)
    GET  /v1/models             GET  /v1/models/{id}    GET /health (no auth)

The ingress does everything but decoding: auth, checking the request (protocol.py), the prompt
(the student card's format, tokenized by `student.data.prompt_ids` as in training), the context
limits, then hands token ids to the model's replicas and turns what they return into OpenAI
responses: raw text, the rationale (`reasoning` / `reasoning_content`) and the task's answer
(`content`), usage, finish reasons, the optional vote. Replicas at capacity (their
`max_queued_requests` full) make a 503 with Retry-After; every error has OpenAI's body and the
server keeps serving.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations
# (`request: Request`) at runtime, and Serve's ingress wrapper cannot resolve them as strings.

import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as p
from .auth import KeyCheck, bearer, key_check
from .engine import RowSpec
from .reasoning import ReasoningStream, answer_of, split_output
from .server import Job
from .students import Served, positions

log = logging.getLogger("ray.serve")

app = FastAPI(title="ftcot-ray students", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods get OpenAI's error body too (FastAPI's default is {"detail"}).
    message = {404: f"no route {request.method} {request.url.path}; routes: POST /v1/chat/completions, "
                    "POST /v1/completions, GET /v1/models, GET /health",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(p.error_body(message, code="not_found" if exc.status_code == 404 else None),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def _framework_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Our routes read the raw body themselves; this only catches a malformed path or query.
    return JSONResponse(p.error_body(f"invalid request: {exc.errors()[:1]}", code="invalid_value"), status_code=400)


@dataclass
class Model:
    served: Served
    tokenizer: Any
    positions: Optional[int]  # decoder-only: prompt + completion limit
    handle: Any

    @property
    def card(self):
        return self.served.card


@serve.deployment
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, served: list[Served], handles: dict, settings: dict):
        from transformers import AutoTokenizer

        self.settings = settings
        self.auth: Optional[KeyCheck] = settings.get("key_check")
        env = settings.get("api_key_env")
        if env and self.auth is None:  # not seen where the app was built: this node must have it
            self.auth = key_check(env, required=True)
        self.models: dict[str, Model] = {}
        for s in served:
            tok = AutoTokenizer.from_pretrained(s.folder)
            self.models[s.id] = Model(s, tok, positions(s.folder), handles[s.id])

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "models": len(self.models)}

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        return await self._guard(request, lambda: {"object": "list", "data": [self._card(m) for m in self.models.values()]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request):
        return await self._guard(request, lambda: self._card(self._model(model_id, "model")))

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._guard(request, lambda: self._generate(request, "chat"))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._guard(request, lambda: self._generate(request, "completions"))

    # ------------------------------------------------------------------ plumbing

    async def _guard(self, request: Request, work) -> Response:
        """Auth, then the work; every failure becomes an OpenAI error response."""
        try:
            self._check_key(request)
            result = work()
            if hasattr(result, "__await__"):
                result = await result
            return result if isinstance(result, Response) else JSONResponse(result)
        except p.APIError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except Exception as e:  # a replica failure, or a bug: 503 for the first, 500 (logged) otherwise
            err = self._unavailable(e)
            if err is None:
                log.exception("ftcot ingress: unexpected error on %s", request.url.path)
                err = p.APIError(500, f"internal error ({type(e).__name__}); the server keeps running",
                                 code="internal_error")
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def _check_key(self, request: Request) -> None:
        if self.auth is None:
            return
        header = request.headers.get("authorization")
        if header is None:
            raise p.APIError(401, "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key",
                             type="authentication_error")
        if not self.auth.ok(bearer(header)):
            raise p.APIError(401, "invalid API key", code="invalid_api_key", type="authentication_error")

    def _unavailable(self, e: Exception) -> Optional[p.APIError]:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        retry = {"Retry-After": str(self.settings["retry_after_s"])}
        if isinstance(e, BackPressureError):
            return p.APIError(503, f"the student is at capacity ({e}); retry after {retry['Retry-After']} s",
                              code="overloaded", headers=retry)
        if isinstance(e, (RayActorError, DeploymentUnavailableError)):
            return p.APIError(503, f"the student's replica is unavailable ({type(e).__name__}); retry shortly",
                              code="unavailable", headers=retry)
        return None

    def _model(self, model_id: str, param: str) -> Model:
        if model_id not in self.models:
            raise p.APIError(404, f"{param}: model {model_id!r} is not served here; served models: "
                             f"{', '.join(self.models)}", param=param, code="model_not_found")
        return self.models[model_id]

    def _card(self, m: Model) -> dict:
        c = m.card
        limit = m.positions or c.max_length
        return {"id": m.served.id, "object": "model", "created": 0, "owned_by": "ftcot-ray", "max_model_len": limit,
                "ftcot": {"family": c.family, "method": c.method, "dataset": c.dataset, "answer_kind": c.rules.kind,
                          "answer_marker": c.answer_marker, "format_from": m.served.card_source}}

    # ------------------------------------------------------------------ generation

    async def _generate(self, request: Request, kind: str) -> Response:
        body = p.parse_body(await request.body(), self.settings["max_body_bytes"])
        req = p.parse_request(body, kind)
        model = self._model(req.model, "model")
        job, n_prompt = self._job(model, req)
        if req.stream:
            return await self._stream(model, req, kind, job, n_prompt)
        rows = await model.handle.complete.remote(job)
        choices, answers = [], []
        for r in rows:
            if kind == "chat":
                reasoning, answer = split_output(model.card, r["text"])
                choices.append(p.chat_choice(r["index"], reasoning, answer, r["finish_reason"]))
            else:
                answer = answer_of(model.card, r["text"])
                choices.append(p.completion_choice(r["index"], r["text"], answer, r["finish_reason"]))
            answers.append(answer)
        vote = p.vote_summary(answers, model.card.rules) if req.vote else None
        use = p.usage(n_prompt, sum(r["tokens"] for r in rows))
        return JSONResponse(p.response(kind, p.new_id(kind), p.now(), req.model, choices, use, vote))

    def _job(self, model: Model, req) -> tuple[Job, int]:
        """Token ids in the student's prompt format, the token budget, and the request's limits."""
        from ..student.data import prompt_ids

        question, param = p.question_of(req)
        card = model.card
        ids = prompt_ids(model.tokenizer, card.prompt(question), card.family)
        asked = req.max_tokens if req.max_tokens is not None else getattr(req, "max_completion_tokens", None)
        budget_param = "max_tokens" if req.max_tokens is not None or not hasattr(req, "max_completion_tokens") \
            else "max_completion_tokens"
        if model.positions:  # decoder-only: prompt and completion share the position table
            prompt_limit, room = model.positions - 1, model.positions - len(ids)
            what = f"{model.positions} positions for the prompt and the completion together"
        else:  # encoder-decoder: the longest input / target it was trained on
            prompt_limit, room = card.max_length, card.max_length
            what = f"inputs and completions of at most {card.max_length} tokens each (train.max_length)"
        if len(ids) > prompt_limit:
            raise p.APIError(400, f"{param}: the question is {len(ids)} tokens in the student's prompt format; "
                             f"model {req.model!r} takes {what}", param=param, code="context_length_exceeded")
        if asked is not None and asked > room:
            raise p.APIError(400, f"{budget_param}: {asked} is more than model {req.model!r} can write after this "
                             f"{len(ids)}-token prompt (at most {room}; it takes {what})", param=budget_param,
                             code="context_length_exceeded")
        max_n = self.settings["max_n"]
        if req.n > max_n:
            raise p.APIError(400, f"n: at most {max_n} choices per request on this server (got {req.n})", param="n",
                             code="invalid_value")
        max_new = asked if asked is not None else min(self.settings["max_tokens"], room)
        temperature = req.temperature or 0.0
        rows = [RowSpec(list(ids), max_new, temperature, req.top_p, None if req.seed is None else req.seed + i)
                for i in range(req.n)]
        return Job(rows=rows, stream=req.stream), len(ids)

    async def _stream(self, model: Model, req, kind: str, job: Job, n_prompt: int) -> Response:
        gen = model.handle.options(stream=True).stream.remote(job)
        try:
            first = await gen.__anext__()  # admitted (or 503) before the 200 and its headers go out
        except StopAsyncIteration:
            first = None
        except BaseException:
            gen.cancel()
            raise
        events = self._events(model, req, kind, gen, first, n_prompt)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, model: Model, req, kind: str, gen, first, n_prompt: int) -> AsyncIterator[bytes]:
        rid, created, card = p.new_id(kind), p.now(), model.card
        usage_on = bool(req.stream_options and req.stream_options.include_usage)
        raw = [""] * req.n
        reasoning = [ReasoningStream(card.answer_marker) for _ in range(req.n)]
        answers: list[Optional[str]] = [None] * req.n
        tokens = [0] * req.n

        def event(choices: list[dict], **extra) -> bytes:
            return p.sse(p.chunk(kind, rid, created, req.model, choices, usage_on, **extra))

        try:
            if kind == "chat":
                for i in range(req.n):
                    yield event([p.chat_delta(i, role="assistant")])
            update = first
            while update is not None:
                for u in update:
                    i, piece, finish = u["index"], u["text"], u["finish_reason"]
                    raw[i] += piece
                    tokens[i] = u["tokens"]
                    for out in self._choice_events(kind, card, i, raw, reasoning, answers, piece, finish):
                        yield event([out])
                update = await gen.__anext__()
        except StopAsyncIteration:
            pass
        except Exception as e:  # headers are gone: the error travels as one last event
            err = self._unavailable(e) or p.APIError(500, f"internal error ({type(e).__name__}) during the stream")
            if err.status == 500:
                log.exception("ftcot ingress: error during a stream")
            yield p.sse(err.body())
            yield p.sse("[DONE]")
            return
        finally:
            gen.cancel()  # no-op when finished; a client that went away frees its rows
        if req.vote:
            yield event([], vote=p.vote_summary(answers, card.rules))
        if usage_on:
            yield event([], usage=p.usage(n_prompt, sum(tokens)))
        yield p.sse("[DONE]")

    @staticmethod
    def _choice_events(kind, card, i, raw, reasoning, answers, piece, finish) -> list[dict]:
        out = []
        if kind == "completions":
            if piece:
                out.append({"index": i, "text": piece, "logprobs": None, "finish_reason": None})
            if finish:
                answers[i] = answer_of(card, raw[i])
                out.append(p.completion_choice(i, "", answers[i], finish))
            return out
        delta = reasoning[i].delta(raw[i], final=finish is not None)
        if delta:
            out.append(p.chat_delta(i, reasoning=delta, reasoning_content=delta))
        if finish:
            answers[i] = answer_of(card, raw[i])
            if answers[i] is not None:
                out.append(p.chat_delta(i, content=answers[i]))
            out.append(p.chat_delta(i, finish_reason=finish))
        return out
