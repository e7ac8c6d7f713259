"""The OpenAI-compatible HTTP API over the engine (FastAPI, served by uvicorn).

POST /v1/completions and /v1/chat/completions (streamed as server-sent events with
`stream: true`), GET /v1/models, POST /v1/adapters and DELETE /v1/adapters/NAME,
GET /health and GET /metrics. Errors are OpenAI's JSON error object with the status that
fits: 400 for a bad field or an over-long prompt, 404 for an unknown model or adapter,
409 for an adapter name in use, 500 if generation itself fails.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from jft.errors import JftError
from jft.serve import engine as engine_module
from jft.serve.adapters import AdapterConflict, AdapterStore, HostAdapter, UnknownAdapter

BASE_ALIAS = "base"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(message: str, status: int, param=None, code=None) -> dict:
    kind = {400: "invalid_request_error", 404: "invalid_request_error",
            409: "invalid_request_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------- request bodies


class _Sampling(BaseModel):
    """Fields both endpoints share, with OpenAI's defaults and ranges."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # vLLM's extension; 0 and -1 switch it off
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of a field this server does not implement, set to other than off."""
        if self.presence_penalty or self.frequency_penalty:
            field = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            return field, "penalties are not supported; leave it at 0"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.logprobs not in (None, False, 0):
            return "logprobs", "logprobs are not supported"
        return None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, "only text content parts are supported", "messages")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


# ---------------------------------------------------------------- the app


class Server:
    """What the routes need: the loaded model, its name, the adapters and the engine."""

    def __init__(self, model, name: str, store: AdapterStore, engine: engine_module.Engine,
                 max_len: int):
        self.model, self.name, self.store, self.engine = model, name, store, engine
        self.max_len = max_len
        self.created = int(time.time())

    def resolve(self, name: str) -> HostAdapter | None:
        """None for the base; the adapter, with a reference taken, otherwise."""
        if name in (self.name, BASE_ALIAS):
            return None
        try:
            return self.store.acquire(name)
        except UnknownAdapter:
            raise ApiError(404, f"The model `{name}` does not exist. Served: {self.name} "
                           f"(or '{BASE_ALIAS}') and the adapters GET /v1/models lists.",
                           "model", "model_not_found") from None
        except JftError as error:  # a folder in --adapter-dir that does not load
            raise ApiError(400, str(error), "model") from None

    def model_card(self, name: str, path=None, adapter: HostAdapter | None = None) -> dict:
        """The base (no path) or an adapter (its folder; `adapter` once loaded)."""
        card = {"id": name, "object": "model", "owned_by": "jft",
                "created": adapter.created if adapter else self.created,
                "root": str(path or self.model.source),
                "parent": None if path is None else self.name}
        if adapter is not None:
            card["method"] = adapter.method
        return card


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="jft", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return JSONResponse(_error_body(error.message, error.status, error.param, error.code),
                            status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = ".".join(location) or None
        message = first.get("msg", "invalid request")
        if field:
            message = f"{field}: {message}"
        return JSONResponse(_error_body(message, 400, field), status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.name}

    @app.get("/metrics")
    async def metrics():
        return Response(server.engine.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        await run_in_threadpool(server.store.rescan)
        cards = [server.model_card(server.name)]
        for name, path, adapter in server.store.names():
            cards.append(server.model_card(name, path, adapter))
        return {"object": "list", "data": cards}

    @app.post("/v1/adapters")
    async def add_adapter(body: AdapterBody):
        try:
            adapter = await run_in_threadpool(server.store.add, body.name, body.path)
        except AdapterConflict as error:
            raise ApiError(409, str(error), "name") from None
        except JftError as error:
            raise ApiError(400, str(error), "path") from None
        return server.model_card(adapter.name, adapter.path, adapter)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        try:
            server.store.delete(name)
        except UnknownAdapter as error:
            raise ApiError(404, str(error), "name", "model_not_found") from None
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        if body.echo or body.suffix or (body.best_of not in (None, body.n)):
            field = "echo" if body.echo else "suffix" if body.suffix else "best_of"
            raise ApiError(400, f"{field} is not supported", field)
        prompts = _completion_prompts(server, body.prompt)
        return await _respond(server, body, request, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = server.model.encode_chat(messages)
        except JftError as error:
            raise ApiError(400, str(error), "messages") from None
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _respond(server, body, request, [prompt], chat=True)

    return app


def _completion_prompts(server: Server, prompt) -> list[list[int]]:
    """Token ids of each prompt: text (with the checkpoint's BOS) or ids given as is."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: give a string, a list of strings or token ids", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    prompts = [server.model.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompt]
    vocab = server.model.config.vocab_size
    for ids in prompts:
        if not ids:
            raise ApiError(400, "prompt: empty after tokenisation", "prompt")
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
    return prompts


async def _respond(server: Server, body: _Sampling, request: Request,
                   prompts: list[list[int]], chat: bool):
    problem = body.unsupported()
    if problem is not None:
        raise ApiError(400, f"{problem[0]}: {problem[1]}", problem[0])
    longest = max(len(p) for p in prompts)
    room = server.max_len - longest
    max_tokens = body.max_tokens if body.max_tokens is not None else room
    if longest + max_tokens > server.max_len:
        field = "max_tokens" if longest < server.max_len else "prompt"
        raise ApiError(400, f"This model's maximum context length is {server.max_len} tokens "
                       f"(--max-len). However, you requested {longest + max_tokens} tokens "
                       f"({longest} in the prompt, {max_tokens} for the completion). Please "
                       "reduce the length of the prompt or the completion.", field)
    adapter = server.resolve(body.model)
    try:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        requests = []
        for p, prompt in enumerate(prompts):
            for j in range(body.n):
                index = p * body.n + j

                def emit(output, index=index):
                    loop.call_soon_threadsafe(queue.put_nowait, (index, output))

                requests.append(engine_module.Request(
                    prompt=prompt, max_tokens=max_tokens, emit=emit, adapter=adapter,
                    temperature=body.temperature, top_p=body.top_p,
                    top_k=max(body.top_k, 0),
                    seed=None if body.seed is None else body.seed + j,
                    stop_ids=frozenset(server.model.stop_ids), stop=tuple(body.stop or ())))
        if adapter is not None:  # each request holds a reference (resolve took the first)
            for _ in requests[1:]:
                server.store.retain(adapter)
        reply = _Reply(server, body, chat, prompts, requests, adapter)
    except BaseException:
        if adapter is not None:
            server.store.release(adapter)
        raise
    for r in requests:
        server.engine.submit(r)
    if body.stream:
        return StreamingResponse(reply.stream(queue), media_type="text/event-stream")
    return await reply.collect(queue, request)


async def _watch_disconnect(request: Request, queue: asyncio.Queue) -> None:
    """Puts None in the reply's queue once the client of a non-streamed reply is gone
    (a streamed one is cancelled by the server itself)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)
    queue.put_nowait(None)


class _Reply:
    """The requests of one API call and how their outputs become OpenAI objects."""

    def __init__(self, server: Server, body: _Sampling, chat: bool, prompts, requests,
                 adapter):
        self.server, self.body, self.chat, self.requests = server, body, chat, requests
        self.prompt_tokens = sum(len(p) for p in prompts) * body.n
        self.adapter = adapter
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.released = False

    def _release(self) -> None:
        """Cancels what has not finished and gives back the adapter references."""
        if self.released:
            return
        self.released = True
        for request in self.requests:
            if not request.done:
                self.server.engine.cancel(request)
            if self.adapter is not None:
                self.server.store.release(self.adapter)

    def _usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    async def collect(self, queue: asyncio.Queue, request: Request) -> dict:
        texts = [""] * len(self.requests)
        counts = [0] * len(self.requests)
        reasons: list[str | None] = [None] * len(self.requests)
        watcher = asyncio.create_task(_watch_disconnect(request, queue))
        try:
            while any(r is None for r in reasons):
                item = await queue.get()
                if item is None:  # the client went away: nobody to answer
                    return {}
                index, output = item
                texts[index] += output.text
                counts[index] = output.token_count
                if output.finish_reason is not None:
                    if output.finish_reason == "error":
                        raise ApiError(500, f"generation failed: {output.error}")
                    reasons[index] = output.finish_reason
        finally:
            watcher.cancel()
            self._release()
        choices = []
        for index, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
            choice = {"index": index, "logprobs": None, "finish_reason": reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.body.model, "choices": choices, "usage": self._usage(sum(counts))}

    async def stream(self, queue: asyncio.Queue) -> AsyncIterator[str]:
        counts = [0] * len(self.requests)
        finished = 0
        try:
            if self.chat:
                for index in range(len(self.requests)):
                    yield self._event(index, {"role": "assistant", "content": ""}, None)
            while finished < len(self.requests):
                index, output = await queue.get()
                counts[index] = output.token_count
                if output.finish_reason == "error":
                    yield "data: " + json.dumps(_error_body(
                        f"generation failed: {output.error}", 500)) + "\n\n"
                    finished += 1
                    continue
                if output.text:
                    yield self._event(index, {"content": output.text} if self.chat
                                      else output.text, None)
                if output.finish_reason is not None:
                    finished += 1
                    yield self._event(index, {} if self.chat else "", output.finish_reason)
            options = self.body.stream_options or {}
            if options.get("include_usage"):
                yield "data: " + json.dumps({
                    "id": self.id, "object": self._chunk_object, "created": self.created,
                    "model": self.body.model, "choices": [],
                    "usage": self._usage(sum(counts))}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away mid-stream: its slots are freed
            self._release()

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _event(self, index: int, content, finish_reason: str | None) -> str:
        choice = {"index": index, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = content
        else:
            choice["text"] = content
        chunk = {"id": self.id, "object": self._chunk_object, "created": self.created,
                 "model": self.body.model, "choices": [choice]}
        return "data: " + json.dumps(chunk) + "\n\n"
