"""`nfsearch serve` under load (slow): 1,000 concurrent streams, a third of whose clients vanish
mid-stream, leave no page or request behind; a dead engine process turns into 503s, not hangs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

pytest.importorskip("openai")
aiohttp = pytest.importorskip("aiohttp")

from test_serve import _get, _wait_idle, start_server

NUM_CONNECTIONS = 1000


async def _stream(session, address: str, i: int, leave_after: int | None) -> int:
    body = {"prompt": f"request {i}", "max_tokens": 24 + i % 17, "ignore_eos": True, "stream": True,
            "temperature": 0.7, "stream_options": {"include_usage": True}}
    async with session.post(f"http://{address}/v1/completions", json=body) as resp:
        assert resp.status == 200
        num_events = 0
        async for line in resp.content:
            if line.startswith(b"data: {"):
                num_events += 1
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    return chunk["usage"]["completion_tokens"]
                if leave_after is not None and num_events >= leave_after:
                    resp.close()                     # drop the connection mid-stream
                    return -1
    raise AssertionError(f"request {i}: stream ended without usage")


@pytest.mark.slow
def test_a_thousand_connections_some_vanishing_leak_nothing(tmp_path):
    with start_server(tmp_path) as (address, _):
        async def run():
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                             connector=aiohttp.TCPConnector(limit=0)) as session:
                return await asyncio.gather(*(_stream(session, address, i, 2 + i % 5 if i % 3 == 0 else None)
                                              for i in range(NUM_CONNECTIONS)))
        results = asyncio.run(run())
        assert [r for i, r in enumerate(results) if i % 3] == [24 + i % 17 for i in range(NUM_CONNECTIONS) if i % 3]
        health = _wait_idle(address, timeout_s=30)
        assert health["num_used_pages"] == 0 and health["num_live_requests"] == 0
        assert health["num_running"] == 0 and health["num_waiting"] == 0
        assert 0 < health["num_cancelled"] <= NUM_CONNECTIONS // 3 + 1


@pytest.mark.slow
def test_a_dead_engine_gives_503_not_a_hang(tmp_path):
    with start_server(tmp_path) as (address, _):
        os.kill(_get(address, "/health")[1]["engine_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _get(address, "/health")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _get(address, "/health")[0] == 503
        import http.client
        conn = http.client.HTTPConnection(address, timeout=10)
        conn.request("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 4}',
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 503 and json.loads(resp.read())["error"]["code"] == "engine_dead"
