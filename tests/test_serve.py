"""`nfsearch serve` on the tiny random model on the CPU, through the official openai client: completions
and chat, streaming and not, usage, stop strings, the offline engine's tokens at temperature 0, bad
input answered with OpenAI-style 4xx bodies while the server keeps serving, and a client that leaves
mid-stream freeing its pages."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("aiohttp")

from conftest import ENGINE_TINY as TINY

from nfsearch.serving.tokenizer import ByteTokenizer, Detokenizer, fallback_chat_prompt

START_TIMEOUT_S = 90


@contextlib.contextmanager
def start_server(log_dir: Path, *args: str, batch_args=("--dense-batch", "64", "--max-decode", "16")):
    """`nfsearch serve` on the tiny model in a subprocess on a free port; yields "host:port" and the process."""
    log_path = log_dir / "server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nfsearch", "serve", "--model", TINY, "--device", "cpu",
                                 "--port", "0", *batch_args, *args],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline, port = time.monotonic() + START_TIMEOUT_S, None
        while port is None:
            match = re.search(r"on http://127\.0\.0\.1:(\d+)", log_path.read_text())
            if match:
                port = int(match.group(1))
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not start:\n{log_path.read_text()}")
            else:
                time.sleep(0.1)
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("serve")) as (address, _):
        yield address


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://{server}/v1", api_key="none", timeout=30, max_retries=0)


def _get(server: str, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(server, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def _post(server: str, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(server, timeout=10)
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def _wait_idle(server: str, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        _, health = _get(server, "/health")
        if health["num_used_pages"] == 0 and health["num_live_requests"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_byte_tokenizer_round_trips_and_streams_whole_characters():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    detok = Detokenizer(tok)
    pieces = [detok.add([i]) for i in ids]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert pieces[ids.index(0xC3)] == ""          # first byte of é: held until the character completes
    assert tok.decode([104, 300, 105]) == "h\ufffdi"
    assert fallback_chat_prompt([{"role": "user", "content": "hi"}]) == "<|user|>\nhi\n<|assistant|>\n"


def test_checkpoint_tokenizer_uses_its_chat_template_and_streams_whole_characters(tmp_path):
    """A folder with a HuggingFace tokenizer (a small byte-level BPE trained here) and a chat template."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nfsearch.serving.tokenizer import HFTokenizer, load_tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["hello world, héllo wörld ✓"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}[assistant] {% endif %}")
    fast.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert tok.decode(tok.chat_prompt_ids([{"role": "user", "content": "hello"}])) == "[user] hello\n[assistant] "
    ids = tok.encode("héllo wörld ✓")
    detok = Detokenizer(tok)
    pieces = [detok.add([i]) for i in ids]
    assert "".join(pieces) == "héllo wörld ✓" and not any("\ufffd" in p for p in pieces)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["engine-tiny"]
    status, health = _get(server, "/health")
    assert status == 200 and health["status"] == "ok" and health["num_pages"] > 0


def test_completion_tokens_equal_the_offline_engine(server, client):
    from nfsearch.runtime.engine import Engine
    from nfsearch.serving.traces import Request
    prompt_ids = [5, 17, 99, 3, 250, 42, 7]
    out = client.completions.create(model="engine-tiny", prompt=prompt_ids, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == 7 and out.usage.completion_tokens == 12 and out.usage.total_tokens == 19
    engine = Engine(TINY, device="cpu", dtype="fp32", dense_batch=64, max_decode=16)
    run = engine.run([Request(0, len(prompt_ids), 12, prompt_ids=tuple(prompt_ids), ignore_eos=True)],
                     sampling={"temperature": 0.0})
    assert choice.model_extra["token_ids"] == run.sequences[0].output_ids
    assert choice.text == ByteTokenizer().decode(run.sequences[0].output_ids)


def test_streaming_completion_with_usage_matches_the_non_streaming_one(client):
    kw = {"model": "engine-tiny", "prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0,
          "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len("The quick brown fox")


def test_chat_completion_streaming_and_not(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model="engine-tiny", messages=messages, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"
    prompt = fallback_chat_prompt(messages)
    assert out.usage.prompt_tokens == len(prompt.encode()) and out.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model="engine-tiny", messages=messages, max_tokens=6,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content


def test_stop_string_cuts_the_text_and_cancels(server, client):
    kw = {"model": "engine-tiny", "prompt": "abc", "max_tokens": 40, "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kw).choices[0].text
    stop = full[6:8]
    out = client.completions.create(stop=[stop], **kw)
    assert out.choices[0].text == full[:full.find(stop)] and out.choices[0].finish_reason == "stop"
    echoed = client.completions.create(stop=[stop, "b"], echo=True, **kw).choices[0].text
    cut = min(i for i in (full.find(stop), full.find("b")) if i >= 0)   # "b" of the echoed prompt never stops it
    assert echoed == "abc" + full[:cut]
    chunks = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert _wait_idle(server)["num_used_pages"] == 0


def test_concurrent_requests_join_the_batch_and_all_finish(server, client):
    def one(i: int):
        return client.completions.create(model="engine-tiny", prompt=f"request {i}", max_tokens=8 + i,
                                         temperature=0.8, seed=i, extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, range(8)))
    assert [o.usage.completion_tokens for o in outs] == [8 + i for i in range(8)]
    assert _wait_idle(server)["num_used_pages"] == 0


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"prompt": "hi", "max_tokens": 4, "frobnicate": 1}', "frobnicate"),
    (b'{"prompt": "hi", "max_tokens": -3}', "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": "four"}', "max_tokens"),
    (b'{"prompt": "hi", "temperature": "hot"}', "temperature"),
    (b'{"prompt": [1, 2, 999]}', "prompt"),
    (b'{"max_tokens": 4}', "prompt"),
    (b'{"prompt": "hi", "max_tokens": 600}', "max_tokens"),
    (json.dumps({"prompt": "x" * 600, "max_tokens": 1}).encode(), "prompt"),
    (b'{"messages": [], "max_tokens": 2}', "messages"),
    (b'{"prompt": "hi", "presence_penalty": 0.5}', None),
])
def test_bad_input_gets_a_4xx_error_body_and_the_server_keeps_serving(server, client, body, param):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    status, out = _post(server, path, body)
    assert status == 400, out
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    assert client.completions.create(model="engine-tiny", prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def test_client_leaving_mid_stream_frees_its_pages(server):
    conn = http.client.HTTPConnection(server, timeout=10)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "a long one", "max_tokens": 500, "ignore_eos": True, "stream": True}).encode(),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    _, before = _get(server, "/health")
    for _ in range(3):
        assert resp.readline().startswith(b"data: ")
        resp.readline()
    _, during = _get(server, "/health")
    assert during["num_used_pages"] > 0 and during["num_live_requests"] == 1
    conn.sock.close()
    conn.close()
    after = _wait_idle(server)
    assert after["num_used_pages"] == 0 and after["num_live_requests"] == 0
    assert after["num_cancelled"] == before["num_cancelled"] + 1


FAMILY = str(Path(TINY).parent / "two-buckets.family.json")   # two buckets of const:8:8: dense batch 32, context 16


@pytest.fixture(scope="module")
def plans_server(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("serve-plans")
    with start_server(log_dir, "--plans", FAMILY, batch_args=()) as (address, _):
        yield address, log_dir / "server.log"


def test_serve_runs_a_plan_family(plans_server):
    """`serve --plans`: the engine takes the family's dense batch, decode slots and buckets (its trace's longest
    request, 16 tokens, bounds a request), says so at start-up, in /v1/models and /health, and gives the offline
    engine's tokens with the same family."""
    from nfsearch.runtime.engine import Engine
    from nfsearch.serving.traces import Request
    address, log_path = plans_server
    assert re.search(r"plan family .*two-buckets.family.json, 2 buckets", log_path.read_text())
    _, models = _get(address, "/v1/models")
    assert models["data"][0]["plans"] == FAMILY and models["data"][0]["max_model_len"] == 16
    _, health = _get(address, "/health")
    assert health["plans"]["trace"] == "const:8:8" and health["plans"]["num_buckets"] == 2
    client = openai.OpenAI(base_url=f"http://{address}/v1", api_key="none", timeout=30, max_retries=0)
    prompt_ids = [5, 17, 99, 3, 250, 42, 7]
    out = client.completions.create(model="engine-tiny", prompt=prompt_ids, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    status, body = _post(address, "/v1/completions", json.dumps({"prompt": "x" * 20, "max_tokens": 1}).encode())
    assert status == 400 and "context of 16 tokens" in body["error"]["message"]
    engine = Engine(TINY, device="cpu", dtype="fp32", plans=FAMILY)
    run = engine.run([Request(0, len(prompt_ids), 8, prompt_ids=tuple(prompt_ids), ignore_eos=True)],
                     sampling={"temperature": 0.0})
    assert out.choices[0].model_extra["token_ids"] == run.sequences[0].output_ids


def test_serve_refuses_a_family_for_another_dense_batch():
    res = subprocess.run([sys.executable, "-m", "nfsearch", "serve", "--model", TINY, "--device", "cpu", "--port", "0",
                          "--plans", FAMILY, "--dense-batch", "64"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 2 and "plan family made for dense batch 32" in res.stderr


def test_online_bench_against_the_server(server, tmp_path):
    from click.testing import CliRunner

    from nfsearch.cli import main
    out = tmp_path / "online.json"
    result = CliRunner().invoke(main, ["bench", "--url", f"http://{server}", "--trace", "const:12:6",
                                       "--num-requests", "6", "--request-rate", "200", "--max-concurrency", "4",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["num_finished"] == 6 and report["num_failed"] == 0 and report["request_rate"] == 200
    assert report["output_tokens_per_s"] > 0 and report["ttft_ms"]["p50"] > 0 and report["itl_ms"]["p99"] > 0
    assert report["tpot_ms"]["mean"] > 0 and report["normalised_latency_ms"]["p90"] > 0
    assert "ttft_ms" in result.output
    assert _wait_idle(server)["num_used_pages"] == 0


def test_poisson_offsets_have_the_asked_rate():
    from nfsearch.serving.online_bench import poisson_offsets
    offsets = poisson_offsets(4000, 50.0, seed=1)
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    assert abs(len(offsets) / offsets[-1] - 50.0) < 5.0
    assert poisson_offsets(3, float("inf"), 0) == [0.0, 0.0, 0.0]
