"""`nfsearch bench --url`: a trace sent to a running OpenAI-compatible server with Poisson arrivals.

Each request is a streaming /v1/completions call with the trace's prompt (token ids, drawn as the
offline bench draws them, within the vocabulary /v1/models reports, else 256), max_tokens = its
output length, ignore_eos, temperature 0 and stream_options.include_usage. Measured per request on
the client: TTFT (send -> first chunk with text or ids), ITL (gaps between such chunks), TPOT
((e2e - TTFT) / (outputs - 1)), end-to-end latency and NanoFlow's normalised latency (e2e / output
tokens; the SLO is on it). Percentiles in ms (mean, p50, p90, p99).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

from nfsearch.errors import NfsearchError
from nfsearch.serving.metrics import Percentiles
from nfsearch.serving.traces import Request, prompt_ids_for


@dataclass
class OnlineRecord:
    request_id: int
    prompt_len: int
    send_s: float
    ttft_s: float | None = None
    e2e_s: float | None = None
    num_output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None


def poisson_offsets(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Send times (s from the start): exponential gaps at request_rate per second; inf: all at 0."""
    if request_rate == float("inf"):
        return [0.0] * num_requests
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(num_requests):
        out.append(t)
        t += rng.expovariate(request_rate)
    return out


async def _one(session, url: str, model: str, request: Request, prompt_ids: list[int], start: float,
               offset_s: float, gate: asyncio.Semaphore | None) -> OnlineRecord:
    await asyncio.sleep(max(0.0, offset_s - (time.perf_counter() - start)))
    body = {"model": model, "prompt": prompt_ids, "max_tokens": request.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if gate is not None:
        await gate.acquire()
    sent = time.perf_counter()
    rec = OnlineRecord(request.request_id, len(prompt_ids), sent - start)
    last = sent
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return rec
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    rec.num_output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and (chunk["choices"][0].get("text") or chunk["choices"][0].get("token_ids")):
                    if rec.ttft_s is None:
                        rec.ttft_s = now - sent
                    else:
                        rec.itl_s.append(now - last)
                    last = now
            rec.e2e_s = time.perf_counter() - sent
    except Exception as exc:  # noqa: BLE001 -- a failed request is counted, the run goes on
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        if gate is not None:
            gate.release()
    return rec


async def _run(url, requests, request_rate, max_concurrency, seed, timeout_s):
    import aiohttp
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        try:
            async with session.get(f"{url}/v1/models") as resp:
                model_info = (await resp.json())["data"][0]
        except Exception as exc:  # noqa: BLE001 -- any failure here means no server to bench
            raise NfsearchError(f"{url}/v1/models: no OpenAI-compatible server answers ({exc})") from None
        vocab = int(model_info.get("vocab_size") or 256)
        prompts = [prompt_ids_for(r, vocab, seed) for r in requests]
        offsets = poisson_offsets(len(requests), request_rate, seed)
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        start = time.perf_counter()
        records = await asyncio.gather(*(_one(session, url, model_info["id"], r, p, start, o, gate)
                                         for r, p, o in zip(requests, prompts, offsets)))
        return model_info["id"], records, time.perf_counter() - start


def run_online_bench(url: str, requests: list[Request], request_rate: float, max_concurrency: int | None = None,
                     slo_ms: float = 200.0, seed: int = 0, timeout_s: float = 3600.0) -> dict:
    url = url.rstrip("/").removesuffix("/v1")
    model, records, duration_s = asyncio.run(_run(url, requests, request_rate, max_concurrency, seed, timeout_s))
    return summarize_online(model, url, records, duration_s, request_rate, max_concurrency, slo_ms)


def summarize_online(model, url, records, duration_s, request_rate, max_concurrency, slo_ms) -> dict:
    done = [r for r in records if r.error is None and r.e2e_s is not None and r.num_output_tokens > 0]

    def ms(values):
        return asdict(Percentiles.of([v * 1000 for v in values]))

    normalised = [r.e2e_s / r.num_output_tokens for r in done]
    meets = [r for r, n in zip(done, normalised) if n * 1000 <= slo_ms]
    out_tokens = sum(r.num_output_tokens for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    return {
        "url": url, "model": model, "request_rate": None if request_rate == float("inf") else request_rate,
        "max_concurrency": max_concurrency, "num_requests": len(records), "num_finished": len(done),
        "num_failed": len(records) - len(done), "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": duration_s, "request_throughput": len(done) / duration_s,
        "output_tokens_per_s": out_tokens / duration_s, "total_tokens_per_s": (in_tokens + out_tokens) / duration_s,
        "ttft_ms": ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": ms([(r.e2e_s - r.ttft_s) / (r.num_output_tokens - 1) for r in done
                       if r.num_output_tokens > 1 and r.ttft_s is not None]),
        "itl_ms": ms([g for r in done for g in r.itl_s]),
        "e2e_ms": ms([r.e2e_s for r in done]),
        "normalised_latency_ms": ms(normalised),
        "slo_ms": slo_ms, "goodput_requests_per_s": len(meets) / duration_s,
        "slo_attainment": len(meets) / len(records) if records else 0.0,
    }


def format_online(report: dict) -> str:
    def row(name):
        p = report[name]
        return (f"  {name:<22} mean {p['mean'] or 0:9.1f}  p50 {p['p50'] or 0:9.1f}  p90 {p['p90'] or 0:9.1f}  "
                f"p99 {p['p99'] or 0:9.1f}")
    rate = report["request_rate"]
    head = (f"{report['model']} at {report['url']}: {report['num_finished']}/{report['num_requests']} requests "
            f"in {report['duration_s']:.1f} s (rate {'inf' if rate is None else f'{rate:g}/s'})")
    rates = (f"  {report['request_throughput']:.2f} req/s, {report['output_tokens_per_s']:.1f} output tok/s, "
             f"{report['total_tokens_per_s']:.1f} total tok/s; goodput {report['goodput_requests_per_s']:.2f} req/s "
             f"({report['slo_attainment']:.0%} under {report['slo_ms']:g} ms/token normalised)")
    lines = [head, rates]
    lines += [row(n) for n in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "normalised_latency_ms")]
    lines += [f"  error: {e}" for e in report["errors"]]
    return "\n".join(lines)
