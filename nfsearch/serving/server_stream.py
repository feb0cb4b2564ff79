"""One request's generation on the HTTP side: ids from the engine -> text, stop strings, the response
(a JSON body, or server-sent events), and cancellation when the client leaves or a stop matches."""

from __future__ import annotations

import json
import time

from aiohttp import web

from nfsearch.serving.api_types import ApiError
from nfsearch.serving.tokenizer import Detokenizer

FINISH_REASONS = {"length": "length", "stop": "stop"}


class Generation:
    def __init__(self, request, client, tokenizer, prompt_ids: list[int], max_tokens: int, body, *,
                 is_chat: bool, echo_text: str = ""):
        self.request, self.client, self.body, self.is_chat = request, client, body, is_chat
        self.prompt_ids, self.max_tokens = prompt_ids, max_tokens
        self.detok = Detokenizer(tokenizer)
        self.stops: list[str] = list(body.stop or [])   # the validator made it a list
        self.hold = max((len(s) for s in self.stops), default=1) - 1   # chars a stop may still complete
        self.text = echo_text                     # echoed prompt + generated text, cut at a stop
        self.num_echo = len(echo_text)            # stops are searched in the generated part only
        self.num_emitted = 0                      # chars of self.text already sent
        self.ids: list[int] = []
        self.finish_reason: str | None = None
        self.is_engine_done = False
        self.created = int(time.time())
        self.is_token_ids = body.return_token_ids

    # ------------------------------------------------------------------------------ engine side
    async def _updates(self):
        """(new_text, new_ids) per engine update until the request ends; sets finish_reason."""
        rid, queue = self.client.add(self.prompt_ids, lambda r: self.body.sampling_params(self.max_tokens, r))
        self.rid = rid
        self.id = f"{'chatcmpl' if self.is_chat else 'cmpl'}-{rid}"
        try:
            while self.finish_reason is None:
                _, new_ids, finish, error = await queue.get()
                if error is not None:
                    self.is_engine_done = True
                    if finish == "dead":
                        raise ApiError(503, error, None, "engine_dead", "server_error")
                    raise ApiError(400, error, "prompt", "request_refused")
                self.ids.extend(new_ids)
                if finish is not None:
                    self.is_engine_done = True
                self.text += self.detok.add(new_ids, is_final=finish is not None)
                cut = self._stop_at()
                if cut is not None:
                    self.text, self.finish_reason = self.text[:cut], "stop"
                elif finish is not None:
                    self.finish_reason = FINISH_REASONS.get(finish, finish)
                yield new_ids
        finally:
            self.client.release(rid, self.is_engine_done)

    def _stop_at(self) -> int | None:
        start = max(self.num_echo, self.num_emitted - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _pending_text(self) -> str:
        """Text safe to send now: all of it once finished, else all but what a stop might still claim."""
        end = len(self.text) if self.finish_reason is not None else max(self.num_emitted, len(self.text) - self.hold)
        out, self.num_emitted = self.text[self.num_emitted:end], end
        return out

    def usage(self) -> dict:
        n = len(self.ids)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n, "total_tokens": len(self.prompt_ids) + n}

    # ------------------------------------------------------------------------------ responses
    async def respond(self) -> web.StreamResponse:
        if self.body.stream:
            return await self._stream()
        async for _ in self._updates():
            pass
        choice = {"index": 0, "finish_reason": self.finish_reason, "logprobs": None}
        if self.is_chat:
            choice["message"] = {"role": "assistant", "content": self.text}
        else:
            choice["text"] = self.text
        if self.is_token_ids:
            choice["token_ids"] = self.ids
        return web.json_response({"id": self.id, "object": "chat.completion" if self.is_chat else "text_completion",
                                  "created": self.created, "model": self.request.app["model_name"],
                                  "choices": [choice], "usage": self.usage()})

    def _chunk(self, text: str | None, finish: str | None, ids=None, first: bool = False) -> dict:
        choice: dict = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.is_chat:
            choice["delta"] = ({"role": "assistant", "content": text or ""} if first
                               else ({"content": text} if text else {}))
        else:
            choice["text"] = text or ""
        if self.is_token_ids and ids is not None:
            choice["token_ids"] = list(ids)
        return {"id": self.id, "object": "chat.completion.chunk" if self.is_chat else "text_completion",
                "created": self.created, "model": self.request.app["model_name"], "choices": [choice]}

    async def _stream(self) -> web.StreamResponse:
        updates = self._updates()
        resp = None
        try:
            async for new_ids in updates:
                if resp is None:          # headers after the first update: a refusal is still a 4xx
                    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
                    await resp.prepare(self.request)
                    if self.is_chat:
                        await _send(resp, self._chunk("", None, [], first=True))
                text = self._pending_text()
                if text or new_ids or self.finish_reason:
                    await _send(resp, self._chunk(text, self.finish_reason, new_ids))
            include_usage = self.body.stream_options is not None and self.body.stream_options.include_usage
            if include_usage:
                await _send(resp, {"id": self.id, "object": "chat.completion.chunk" if self.is_chat
                                   else "text_completion", "created": self.created,
                                   "model": self.request.app["model_name"], "choices": [], "usage": self.usage()})
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ApiError as exc:
            if resp is None:
                raise
            # an error after the headers went out (the engine died): the last event says so
            await _send(resp, exc.body())
            await resp.write_eof()
        finally:
            await updates.aclose()         # the client left mid-stream: cancel in the engine, free pages
        return resp


async def _send(resp: web.StreamResponse, data: dict) -> None:
    await resp.write(b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")
