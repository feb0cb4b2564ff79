"""`nfsearch serve`: an OpenAI-compatible HTTP server (aiohttp) in front of the engine process.

The engine loop runs in a process of its own (runtime.engine_worker, spawned), so HTTP, JSON and
detokenisation never hold the GIL it needs. This process owns the tokenizer: it encodes prompts,
sends ("add", id, prompt_ids, sampling) to the engine, turns the ids streamed back into text, checks
stop strings on that text (a match cancels the request in the engine) and cancels a request whose
client went away, which frees its KV pages.

Endpoints: POST /v1/completions, POST /v1/chat/completions (stream=true: server-sent events;
stream_options.include_usage adds a last chunk with usage), GET /v1/models (`plans`: the plan
family's path or null), GET /health (status, the engine's counters: num_used_pages, num_running,
num_waiting, num_live_requests, and `plans`: the family the engine runs, `serve --plans`, with its
trace, buckets and prediction, or null). Extra request field `return_token_ids` (as vLLM's):
non-streaming choices and stream chunks carry the ids.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import multiprocessing as mp
import queue
import threading
import time
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

from nfsearch.errors import NfsearchError
from nfsearch.serving.api_types import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    error_body,
    validation_message,
)
from nfsearch.serving.server_stream import Generation
from nfsearch.serving.tokenizer import load_tokenizer

START_TIMEOUT_S = 600.0


class EngineClient:
    """The engine process and its queues; a reader thread routes its messages onto the event loop."""

    def __init__(self, engine_kwargs: dict):
        ctx = mp.get_context("spawn")
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        from nfsearch.runtime.engine_worker import worker_main  # torch is imported in the child only
        self.proc = ctx.Process(target=worker_main, args=(engine_kwargs, self.inbox, self.outbox),
                                daemon=True, name="nfsearch-engine")
        self.proc.start()
        self.info = self._wait_ready()
        self.stats: dict = {"num_used_pages": 0, "num_running": 0, "num_waiting": 0, "num_live_requests": 0}
        self.streams: dict[int, asyncio.Queue] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.is_dead = False
        self._ids = itertools.count(1)

    def _wait_ready(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                kind, payload = self.outbox.get(timeout=0.5)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise NfsearchError(f"the engine process exited during start-up (code {self.proc.exitcode})")
                continue
            if kind == "fatal":
                raise NfsearchError(f"engine start-up failed: {payload}")
            return payload
        raise NfsearchError(f"the engine did not start within {START_TIMEOUT_S:.0f} s")

    def start_reader(self, loop) -> None:
        self.loop = loop
        threading.Thread(target=self._read, daemon=True, name="engine-reader").start()

    def _read(self) -> None:
        while True:
            try:
                kind, payload = self.outbox.get(timeout=1.0)
            except queue.Empty:
                if not self.proc.is_alive():
                    self._fail_all()
                    return
                continue
            except (EOFError, OSError):
                self._fail_all()
                return
            if kind == "tokens":
                for update in payload:
                    q = self.streams.get(update[0])
                    if q is not None:
                        self.loop.call_soon_threadsafe(q.put_nowait, update)
            elif kind == "stats":
                self.stats = payload

    def _fail_all(self) -> None:
        """The engine process is gone: every open request ends with an error (503), as do new ones."""
        self.is_dead = True
        for rid, q in list(self.streams.items()):
            self.loop.call_soon_threadsafe(q.put_nowait, (rid, [], "dead", "the engine process exited"))

    def add(self, prompt_ids: list[int], sampling_for) -> tuple[int, asyncio.Queue]:
        if self.is_dead or not self.proc.is_alive():
            raise ApiError(503, "the engine process exited", code="engine_dead", kind="server_error")
        rid = next(self._ids)
        q: asyncio.Queue = asyncio.Queue()
        self.streams[rid] = q
        self.inbox.put(("add", rid, prompt_ids, sampling_for(rid)))
        return rid, q

    def release(self, rid: int, is_finished: bool) -> None:
        self.streams.pop(rid, None)
        if not is_finished:
            self.inbox.put(("cancel", rid))

    def close(self, timeout_s: float = 10.0) -> None:
        try:
            self.inbox.put(("stop",))
            self.proc.join(timeout_s)
        finally:
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(5)


def make_app(client: EngineClient, tokenizer, model_name: str) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app["client"], app["tokenizer"], app["model_name"] = client, tokenizer, model_name
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


@web.middleware
async def _errors(request, handler):
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        return web.json_response(error_body(exc.reason, "invalid_request_error", None, exc.status),
                                 status=exc.status)
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception as exc:                  # a bug: say so in the body; the server keeps serving
        logging.getLogger("nfsearch.serve").exception("request failed")
        return web.json_response(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                                 status=500)


async def _body(request, model_cls):
    try:
        raw = await request.read()
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise ApiError(400, message, param) from None


def _max_tokens(client: EngineClient, prompt_ids: list[int], asked: int | None) -> int:
    limit = client.info["max_model_len"]
    if len(prompt_ids) >= limit:
        raise ApiError(400, f"prompt of {len(prompt_ids)} tokens leaves no room in the model's context of "
                       f"{limit} tokens", "prompt", "context_length_exceeded")
    if asked is None:
        return limit - len(prompt_ids)
    if len(prompt_ids) + asked > limit:
        raise ApiError(400, f"prompt of {len(prompt_ids)} tokens + max_tokens {asked} exceeds the model's "
                       f"context of {limit} tokens", "max_tokens", "context_length_exceeded")
    return asked


async def completions(request):
    body = await _body(request, CompletionRequest)
    client, tok = request.app["client"], request.app["tokenizer"]
    prompt = body.prompt
    prompt_ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
    vocab = client.info["vocab_size"]
    if any(not 0 <= i < vocab for i in prompt_ids):
        raise ApiError(400, f"prompt: token ids must be in 0..{vocab - 1}", "prompt")
    gen = Generation(request, client, tok, prompt_ids, _max_tokens(client, prompt_ids, body.max_tokens), body,
                     is_chat=False, echo_text=prompt if body.echo and isinstance(prompt, str) else "")
    return await gen.respond()


async def chat_completions(request):
    body = await _body(request, ChatRequest)
    client, tok = request.app["client"], request.app["tokenizer"]
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids = tok.chat_prompt_ids(messages)
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    gen = Generation(request, client, tok, prompt_ids, _max_tokens(client, prompt_ids, asked), body, is_chat=True)
    return await gen.respond()


async def models(request):
    return web.json_response({"object": "list", "data": [
        {"id": request.app["model_name"], "object": "model", "created": 0, "owned_by": "nfsearch",
         "max_model_len": request.app["client"].info["max_model_len"],
         "vocab_size": request.app["client"].info["vocab_size"],
         "plans": (request.app["client"].info.get("plans") or {}).get("path")}]})


async def health(request):
    client = request.app["client"]
    status = "ok" if client.proc.is_alive() else "engine process exited"
    return web.json_response({"status": status, "engine_pid": client.proc.pid, **client.stats,
                              "plans": client.info.get("plans")}, status=200 if status == "ok" else 503)


def serve(model: str, host: str, port: int, engine_kwargs: dict, echo=print) -> None:
    """Start the engine process, then serve HTTP until interrupted."""
    tokenizer = load_tokenizer(model)
    model_name = Path(model).name if Path(model).exists() else model
    if model_name == "config.json":
        model_name = Path(model).parent.name
    client = EngineClient({"model": model, **engine_kwargs})
    echo(client.info["description"])
    try:
        asyncio.run(_serve_http(client, tokenizer, model_name, host, port, echo))
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


async def _serve_http(client, tokenizer, model_name, host, port, echo) -> None:
    import signal
    client.start_reader(asyncio.get_running_loop())
    runner = web.AppRunner(make_app(client, tokenizer, model_name), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port
    plans = client.info.get("plans")
    with_plans = f"; plan family {plans['path']}, {plans['num_buckets']} buckets" if plans else ""
    echo(f"serving {model_name} on http://{host}:{bound} (tokenizer: {tokenizer.name}{with_plans})")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
