"""The OpenAI-compatible HTTP API over the continuous-batching engine (Starlette; uvicorn
runs it, train/inference/serving.py starts both).

Routes: POST /v1/completions and /v1/chat/completions (`stream: true` answers with
server-sent events in OpenAI's chunk format), GET /v1/models, /health, /metrics
(Prometheus). Every error is OpenAI's error JSON: 400 for a request we cannot serve as
asked, 404 for another model's name or an unknown route, 429 when serve.max_queue
requests wait already, 503 while the model loads or the server drains.

The engine runs on its own thread; each request's tokens come back to the event loop
through an asyncio queue, are turned into text there (TextStream: whole characters,
cut at stop strings) and sent. A client that goes away cancels its requests, which
frees their slots at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from typing import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from train.errors import DataError, InputError
from train.inference.api import ApiError, ChatRequest, CompletionRequest, parse
from train.inference.engine import QueueFull, Request, Sampling
from train.inference.serve_metrics import ServeMetrics
from train.inference.text import TextStream

log = logging.getLogger("train")
POLL_S = 0.25  # how often a waiting handler checks that its client is still there


class Service:
    """Text requests on the engine: prompts tokenized (chat rendered with the model's
    template), new tokens streamed back as text."""

    def __init__(self, engine, tokenizer, template, *, model_name: str,
                 chat_stop_ids: frozenset[int] = frozenset(),
                 metrics: ServeMetrics | None = None):
        self.engine, self.tok, self.template = engine, tokenizer, template
        self.model_name, self.chat_stop_ids = model_name, chat_stop_ids
        self.metrics = metrics or ServeMetrics()
        self.metrics.watch(engine)
        self.vocab = engine.vocab_limit


class State:
    """What the routes see: "starting" until the service is ready, "draining" after
    SIGTERM."""

    def __init__(self, model_name: str, metrics: ServeMetrics | None = None):
        self.status, self.model_name = "starting", model_name
        self.metrics = metrics or ServeMetrics()
        self.service: Service | None = None

    def ready(self, service: Service) -> None:
        self.service, self.status = service, "ready"

    def serving(self) -> Service:
        if self.status == "starting":
            raise ApiError(503, "the server is starting (loading and compiling the model); "
                           "retry shortly", type="service_unavailable")
        if self.status != "ready":
            raise ApiError(503, "the server is shutting down", type="service_unavailable")
        return self.service


class Generation:
    """One prompt's request on the engine and its text so far."""

    def __init__(self, request: Request, stream: TextStream):
        self.request, self.stream = request, stream
        self.count = 0  # new tokens received
        self.reason: str | None = None  # how it ended
        self.last: float | None = None  # when its latest token came


class Results:
    """The requests of one HTTP request (a choice per prompt, each submitted with
    `sampling`) and their text as the engine produces it."""

    def __init__(self, service: Service, prompts: list[list[int]], sampling: Sampling,
                 stops: list[str], stop_ids: frozenset[int], disconnected: Callable):
        self.service, self.prompts, self.disconnected = service, prompts, disconnected
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.arrived = time.perf_counter()
        self.gens = []
        for i, ids in enumerate(prompts):
            request = Request(ids, sampling, stop_ids=stop_ids,
                              on_tokens=lambda ts, i=i: self._emit("tokens", i, ts),
                              on_finish=lambda r, i=i: self._finished(i, r))
            self.gens.append(Generation(request, TextStream(service.tok.decode, stops)))

    def _emit(self, *event) -> None:  # on the engine's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (*event, time.perf_counter()))

    def _finished(self, i: int, reason: str) -> None:  # on the engine's thread
        # counted here, where it ends even when nobody reads it any more; a stop string
        # (the reason set before the cancel) is a "stop"
        self.service.metrics.finished.labels(self.gens[i].reason or reason).inc()
        self._emit("finish", i, reason)

    def submit(self) -> None:
        """Queue every prompt on the engine: a 429 when the queue is full, a 400 when a
        prompt and its max_tokens do not fit (nothing stays queued then)."""
        try:
            for g in self.gens:
                self.service.engine.submit(g.request)
                self.service.metrics.prompt_tokens.inc(len(g.request.prompt))
        except QueueFull as e:
            self.cancel()
            raise ApiError(429, str(e), type="rate_limit_exceeded",
                           code="rate_limit_exceeded") from None
        except InputError as e:
            self.cancel()
            raise ApiError(400, str(e), param="max_tokens") from None

    def cancel(self) -> None:
        """Cancel what is still running (its slot is freed at the engine's next step)."""
        for g in self.gens:
            if g.reason is None:
                g.request.cancel()

    @property
    def usage(self) -> dict:
        prompt = sum(map(len, self.prompts))
        new = sum(g.count for g in self.gens)
        return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}

    async def events(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, new text, finish reason or None) until every prompt has ended;
        it ends early, cancelling the rest, when the client goes away. The tokens that
        arrived together (an engine call decodes several) go out as one text."""
        live = len(self.gens)
        try:
            while live:
                try:
                    arrived = [await asyncio.wait_for(self.queue.get(), POLL_S)]
                except asyncio.TimeoutError:
                    if await self.disconnected():
                        return
                    continue
                while not self.queue.empty():
                    arrived.append(self.queue.get_nowait())
                texts: dict[int, str] = {}  # each choice's text not yet sent
                for kind, i, value, now in arrived:
                    text, reason = self._take(kind, i, value, now)
                    texts[i] = texts.get(i, "") + text
                    if reason is not None:
                        live -= 1
                        yield i, texts.pop(i), reason
                for i, text in texts.items():
                    if text:
                        yield i, text, None
        finally:
            self.cancel()

    def _take(self, kind: str, i: int, value, now: float) -> tuple[str, str | None]:
        """One event of choice i: (its new text, its finish reason or None)."""
        g, metrics = self.gens[i], self.service.metrics
        if g.reason is not None:  # ended by a stop string: the cancel's echo
            return "", None
        if kind == "tokens":  # arrived together: the first after a wait, the rest at once
            texts = []
            for token in value:  # up to the one that completes a stop string
                texts.append(g.stream.push(token))
                if g.stream.stopped:
                    break
            since = now - (self.arrived if g.last is None else g.last)
            (metrics.ttft if g.last is None else metrics.itl).observe(since)
            for _ in texts[1:]:
                metrics.itl.observe(0.0)
            metrics.token(now, len(texts))
            g.count, g.last = g.count + len(texts), now
            text = "".join(texts)
            if not g.stream.stopped:
                return text, None
            value = g.reason = "stop"  # before the cancel: see _finished
            g.request.cancel()
        else:
            text = g.stream.finish()
        g.reason = value
        return text, value


# ---------------------------------------------------------------------- request bodies


def sampling_of(body, max_tokens: int) -> Sampling:
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    return Sampling(max_tokens=max_tokens, temperature=body.temperature,
                    top_k=max(body.top_k, 0), top_p=body.top_p, seed=seed,
                    ignore_eos=body.ignore_eos)


def completion_prompts(service: Service, prompt) -> list[list[int]]:
    """A completion request's prompts as token ids (texts get the tokenizer's own
    special tokens, e.g. Llama's BOS, as train.generate's prompts do)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is an empty list; give a text", param="prompt")
    texts = [p for p in prompt if isinstance(p, str)]
    encode = getattr(service.tok, "encode_prompts", service.tok.encode_batch)
    encoded = iter(encode(texts) if texts else [])
    out = [next(encoded) if isinstance(p, str) else list(p) for p in prompt]
    if any(not ids for ids in out):
        raise ApiError(400, "a prompt has no tokens; give some text", param="prompt")
    if any(not 0 <= t < service.vocab for ids in out for t in ids):
        raise ApiError(400, f"a prompt token id is outside the vocabulary [0, "
                       f"{service.vocab})", param="prompt")
    return out


def chat_prompt(service: Service, body: ChatRequest) -> list[int]:
    """The conversation rendered with the model's chat template (generation prompt
    added), tokenized as the template wrote it (its own BOS, no other added)."""
    if service.template is None:
        raise ApiError(400, f"the model {service.model_name!r} has no chat template "
                       "(chat_template.jinja or tokenizer_config.json's chat_template beside "
                       "its tokenizer); use /v1/completions", param="messages")
    messages = [{**m.model_extra, "role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = service.template.render(messages, add_generation_prompt=True, where="messages")
    except DataError as e:
        raise ApiError(400, str(e), param="messages") from None
    return service.tok.encode_batch([text])[0]


def limit(service: Service, asked: int | None, prompts: list[list[int]]) -> int:
    """max_tokens, or (null) whatever of serve.max_len the longest prompt leaves."""
    if asked is not None:
        return asked
    room = service.engine.max_len - max(map(len, prompts))
    if room < 1:
        raise ApiError(400, f"the prompt's {max(map(len, prompts))} tokens fill serve.max_len="
                       f"{service.engine.max_len}; shorten it", param="messages")
    return room


# ---------------------------------------------------------------------- routes


def make_app(state: State) -> Starlette:
    def gated(route: str, handler):
        async def endpoint(http: HttpRequest) -> Response:
            try:
                response = await handler(http)
            except ApiError as e:
                response = JSONResponse(e.body(), status_code=e.status)
            state.metrics.requests.labels(route, str(response.status_code)).inc()
            return response
        return endpoint

    async def completions(http: HttpRequest) -> Response:
        body = parse(await http.body(), CompletionRequest)
        service = state.serving()
        _check_model(service, body.model)
        prompts = completion_prompts(service, body.prompt)
        sampling = sampling_of(body, limit(service, body.max_tokens, prompts))
        run = Results(service, prompts, sampling, body.stops(), frozenset(),
                      http.is_disconnected)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": service.model_name}

        def choice(i, text, reason):
            return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
        return await _answer(body, run, head, choice, first=None)

    async def chat(http: HttpRequest) -> Response:
        body = parse(await http.body(), ChatRequest)
        service = state.serving()
        _check_model(service, body.model)
        prompts = [chat_prompt(service, body)]
        sampling = sampling_of(body, limit(service, body.limit(), prompts))
        run = Results(service, prompts, sampling, body.stops(), service.chat_stop_ids,
                      http.is_disconnected)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": service.model_name}

        def choice(i, text, reason, stream=False):
            if stream:
                delta = {"content": text} if text else {}
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": i, "message": {"role": "assistant", "content": text},
                    "logprobs": None, "finish_reason": reason}
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
        return await _answer(body, run, head, choice, first=first)

    async def models(http: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": int(time.time()),
             "owned_by": "shardlm",
             "max_model_len": state.service.engine.max_len if state.service else None}]})

    async def health(http: HttpRequest) -> Response:
        state.serving()
        return JSONResponse({"status": "ok"})

    async def metrics(http: HttpRequest) -> Response:
        data, content_type = state.metrics.exposition()
        return Response(data, media_type=content_type)

    async def http_error(http: HttpRequest, e: HTTPException) -> Response:
        message = {404: f"no route {http.url.path}", 405: f"{http.method} is not allowed on "
                   f"{http.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code)

    async def server_error(http: HttpRequest, e: Exception) -> Response:
        log.exception("serving %s failed", http.url.path)
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}",
                                     type="server_error").body(), status_code=500)

    routes = [Route("/v1/completions", gated("completions", completions), methods=["POST"]),
              Route("/v1/chat/completions", gated("chat", chat), methods=["POST"]),
              Route("/v1/models", gated("models", models), methods=["GET"]),
              Route("/health", gated("health", health), methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                        Exception: server_error})


def _check_model(service: Service, name: str) -> None:
    if name != service.model_name:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                       f"{service.model_name!r} (GET /v1/models)", param="model",
                       code="model_not_found")


async def _answer(body, run: Results, head: dict, choice, first) -> Response:
    """The whole response, or (stream) its server-sent events; `first`: a chunk choice
    sent before any text (chat's role). The prompts are queued before the response
    starts, so a full queue is a 429, not a broken stream."""
    run.submit()
    if not body.stream:
        texts, reasons = [""] * len(run.gens), [None] * len(run.gens)
        async for i, text, reason in run.events():
            texts[i] += text
            reasons[i] = reason or reasons[i]
        return JSONResponse({**head, "choices": [choice(i, t, r) for i, (t, r) in
                                                 enumerate(zip(texts, reasons))],
                             "usage": run.usage})
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chat = first is not None
    chunk_head = dict(head, object="chat.completion.chunk" if chat else head["object"])

    def sse(choices, **extra) -> str:
        data = {**chunk_head, "choices": choices, **extra}
        if include_usage:
            data.setdefault("usage", None)
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def stream():
        events = run.events()
        try:
            if chat:
                yield sse([first])
            async for i, text, reason in events:
                yield sse([choice(i, text, reason, stream=True) if chat else
                           choice(i, text, reason)])
            if include_usage:
                yield sse([], usage=run.usage)
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()
    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
