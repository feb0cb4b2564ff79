"""The engine across TP ranks on the CPU: gloo, spawned ranks, fp32. A TP=2 run of a small trace gives
the same tokens as a one-process engine, every rank samples the same ids before rank 0's broadcast,
teacher-forced logits match and each rank's KV cache holds its KV heads of the one-process cache;
TP degrees that do not divide the heads or FFN are refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ENGINE_TINY as TINY

from nfsearch.errors import NfsearchError
from nfsearch.runtime import engine_tp
from nfsearch.runtime.engine import Engine, TraceShape
from nfsearch.runtime.tp import spawn_ranks
from nfsearch.serving.model_config import load_model_config
from nfsearch.serving.traces import Request

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _requests(n: int) -> list[Request]:
    """Mixed lengths: batches mix decode rows with prefill chunks of different prefixes."""
    return [Request(i, 5 + (7 * i) % 37, 3 + (5 * i) % 11) for i in range(n)]


def _kwargs(requests, **kw) -> dict:
    return dict(dtype="fp32", dense_batch=32, max_decode=8, trace_shape=TraceShape.of(requests), **kw)


def _tp_run(tmp_path, model, world, requests, sampling, rank_overrides=None, **kw) -> list[dict]:
    pattern = str(tmp_path / "rank{rank}.pt")
    spawn_ranks(engine_tp.rank_main, world, "gloo",
                (model, _kwargs(requests, is_debug=True, **kw), requests, sampling, pattern, True, rank_overrides))
    return [torch.load(pattern.format(rank=r)) for r in range(world)]


def _reference(model, requests, sampling, **kw):
    engine = Engine(model, device="cpu", **_kwargs(requests, **kw))
    logits = engine_tp.teacher_forced_logits(engine)
    kv = engine.model.kv.clone()
    run = engine.run(requests, sampling=sampling)
    return {s.seq_id: list(s.output_ids) for s in run.sequences}, logits, kv, run


def _check(parts, reference, world, hkv):
    tokens, logits, kv, run = reference
    for part in parts:
        assert part["num_id_mismatches"] == 0            # same ids on every rank before the broadcast
        assert part["tokens"] == tokens
        assert part["num_iterations"] == len(run.iterations)
        assert part["limits"] == parts[0]["limits"]
        for mine, ref in zip(part["logits"], logits):
            torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)
        per_rank = hkv // world                          # its KV heads, [layers, 2, pages, page, Hkv, D]
        r = part["rank"]
        torch.testing.assert_close(part["kv"], kv[..., r * per_rank:(r + 1) * per_rank, :], rtol=1e-4, atol=1e-5)


def test_tp2_equals_one_process(tmp_path):
    reqs = _requests(10)
    sampling = {"temperature": 0.8, "top_k": 20, "seed": 3}      # sampled, not only argmax
    # rank 1 would size a larger batch and cache (as more free memory would give): both take rank 0's
    parts = _tp_run(tmp_path, TINY, 2, reqs, sampling, {1: {"dense_batch": 48, "num_pages": 80}}, num_pages=64)
    _check(parts, _reference(TINY, reqs, sampling, num_pages=64), 2, 2)
    assert parts[1]["limits"] == (32, 8, 64)
    assert all(len(t) == r.output_len for t, r in zip(parts[0]["tokens"].values(), reqs))


@pytest.mark.parametrize("world, what", [(3, "4 attention heads"), (4, "2 key/value heads")])
def test_non_divisible_tp_degree_is_refused(world, what):
    cfg = load_model_config(TINY)
    with pytest.raises(NfsearchError, match=f"model .*'s {what} are not divisible by TP={world}") as e:
        engine_tp.shard_config(cfg, world)
    assert "\n" not in str(e.value)


def test_ffn_width_is_checked(tmp_path):
    import json
    cfg = json.loads(Path(TINY).read_text()) | {"num_attention_heads": 6, "num_key_value_heads": 2,
                                                 "intermediate_size": 129, "head_dim": 16, "hidden_size": 96}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NfsearchError, match=r"129 FFN columns \(intermediate_size\) are not divisible by TP=2"):
        engine_tp.check_tp(load_model_config(str(tmp_path / "config.json")), 2)


def test_shards_sum_to_the_full_layer():
    """In one process: the ranks' partial O and D outputs sum to the full GEMMs (the sharding alone)."""
    from nfsearch.runtime.weights import load_weights
    cfg = load_model_config(TINY)
    full = load_weights(cfg, dtype=torch.float32, seed=5).layers[0]
    m, world = cfg.spec, 2
    shards = [engine_tp.shard_layer(cfg, full, r, world) for r in range(world)]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, m.hidden_size, generator=gen)
    ug = h @ full.wug
    act = torch.nn.functional.silu(ug[:, :m.intermediate_size]) * ug[:, m.intermediate_size:]
    parts = []
    for s in shards:
        u = h @ s.wug
        half = u.shape[1] // 2
        parts.append((torch.nn.functional.silu(u[:, :half]) * u[:, half:]) @ s.wd)
    torch.testing.assert_close(sum(parts), act @ full.wd, rtol=1e-5, atol=1e-6)
    q_cols = torch.cat([s.wqkv[:, :m.q_size // world] for s in shards], dim=1)
    torch.testing.assert_close(q_cols, full.wqkv[:, :m.q_size])
    attn = torch.randn(3, m.q_size, generator=gen)
    o_parts = [attn[:, r * m.q_size // world:(r + 1) * m.q_size // world] @ s.wo for r, s in enumerate(shards)]
    torch.testing.assert_close(sum(o_parts), attn @ full.wo, rtol=1e-5, atol=1e-6)
    for s in shards:                                     # tensors of their own: the full layer can go
        for t in (s.wqkv, s.wo, s.wug, s.wd):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.slow
def test_tp2_checkpoint_folder_with_qkv_bias_and_preemption(tmp_path):
    """A Qwen2 checkpoint (q/k/v biases, tied embeddings) saved by transformers, each rank sharding it
    on load; a cache small enough that requests are preempted and recomputed."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, num_hidden_layers=2, vocab_size=256,
                                   max_position_embeddings=512, rope_theta=30000.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=True, initializer_range=0.2, eos_token_id=2)
    torch.manual_seed(0)
    folder = tmp_path / "qwen2"
    transformers.Qwen2ForCausalLM(cfg).to(torch.float32).save_pretrained(folder)
    reqs, sampling = _requests(12), {"temperature": 0.0}
    reference = _reference(str(folder), reqs, sampling, num_pages=8, predicted_output_len=1)
    assert reference[3].num_preemptions > 0
    parts = _tp_run(tmp_path, str(folder), 2, reqs, sampling, num_pages=8, predicted_output_len=1)
    _check(parts, reference, 2, 2)
    assert [p["num_preemptions"] for p in parts] == [reference[3].num_preemptions] * 2


@pytest.mark.slow
def test_tp4_equals_one_process(tmp_path):
    import json
    config = json.loads(Path(TINY).read_text()) | {"num_attention_heads": 8, "num_key_value_heads": 4,
                                                    "head_dim": 8}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    reqs, sampling = _requests(8), {"temperature": 0.0}
    parts = _tp_run(tmp_path, str(path), 4, reqs, sampling, num_pages=64)
    _check(parts, _reference(str(path), reqs, sampling, num_pages=64), 4, 4)


def test_bench_tp_refuses_a_non_divisible_degree_in_one_line(tmp_path):
    from click.testing import CliRunner

    from nfsearch.cli import main
    result = CliRunner().invoke(main, ["bench", "--model", TINY, "--trace", "const:16:4", "--num-requests", "2",
                                       "--device", "cpu", "--tp", "3", "-o", str(tmp_path / "b.json")])
    assert result.exit_code == 2
    assert "are not divisible by TP=3" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_tp2_on_the_cpu(tmp_path):
    import json

    from click.testing import CliRunner

    from nfsearch.cli import main
    out = tmp_path / "b.json"
    args = ["bench", "--model", TINY, "--trace", "const:24:6", "--num-requests", "8", "--device", "cpu",
            "--dense-batch", "64"]
    result = CliRunner().invoke(main, args + ["--tp", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["tp_degree"] == 2 and report["summary"]["num_gpus"] == 2
    assert report["summary"]["num_finished"] == 8 and report["summary"]["output_tokens"] == 8 * 6
    assert "x 2 (tensor parallel)" in result.output


def test_tpot_cap_is_refused_under_tp():
    """Its budget follows each rank's own clock: replicated schedulers would diverge."""
    from types import SimpleNamespace
    rank = SimpleNamespace(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(NfsearchError, match="TPOT cap"):
        engine_tp.TpEngine(TINY, rank, dtype="fp32", max_tpot_ms=50.0)


def test_late_arrivals_are_refused_under_tp():
    """Each rank would admit them by its own clock."""
    engine = object.__new__(engine_tp.TpEngine)
    with pytest.raises(NfsearchError, match="arrive at t=0"):
        engine.run([Request(0, 8, 4), Request(1, 8, 4, arrival_s=0.5)])


@pytest.mark.slow
def test_a_refusal_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1 plans against too little memory: it refuses, and rank 0 stops instead of waiting on it."""
    import torch.multiprocessing as mp
    reqs = _requests(2)
    with pytest.raises(mp.ProcessRaisedException, match="refused its start-up|memory"):
        _tp_run(tmp_path, TINY, 2, reqs, None, {1: {"memory_bytes": 1 << 20}}, num_pages=64)


def test_compare_variants_are_reduced_too(monkeypatch):
    """bench --compare's baseline twin swaps the dense kernels: its O and D must still be all-reduced."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from nfsearch.runtime.tp import free_port
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        reqs = _requests(4)
        rank = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
        engine = engine_tp.TpEngine(TINY, rank, variants=("plan", "baseline"), **_kwargs(reqs, num_pages=64))
        calls = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: calls.append(t.shape) or real(t, *a, **k))
        run = engine.run(reqs, compare_every=1)
        num_layers = engine.cfg.spec.num_layers
        assert {r.variant for r in run.iterations} == {"plan", "baseline"}
        assert len(calls) == 2 * num_layers * len(run.iterations)
        plain = Engine(TINY, device="cpu", **_kwargs(reqs, num_pages=64)).run(reqs)
        assert [s.output_ids for s in run.sequences] == [s.output_ids for s in plain.sequences]
    finally:
        dist.destroy_process_group()
