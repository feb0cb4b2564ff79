"""Plan families (nfsearch.family): the engine's buckets worked out torch-free, the scheduler's batches
per bucket and their coverage, the family file, its prediction, and the solve time (issues 22 and 25)."""

import json
import math
import time

import pytest
from click.testing import CliRunner

from nfsearch.cli import main
from nfsearch.errors import NfsearchError
from nfsearch.family import artifact
from nfsearch.family.build import solve_family
from nfsearch.family.collect import BucketHits, composition, quantiles, run_scheduler
from nfsearch.family.engine_shape import engine_shape
from nfsearch.family.predict import BucketPrediction, predict_trace
from nfsearch.runtime.engine_memory import TraceShape
from nfsearch.serving.batch import Bucket
from nfsearch.serving.model_config import load_model_config
from nfsearch.serving.traces import Request, load_trace
from nfsearch.simulate import verify
from nfsearch.specs import load_gpu
from tests.conftest import ENGINE_TINY

H100_BYTES = load_gpu("h100-sxm").memory_bytes
LLAMA = load_model_config("llama-3-8b")


def _shape(trace: str, num_requests: int, **kw):
    requests = load_trace(trace, num_requests, 0, max_context=LLAMA.max_model_len).requests
    return requests, engine_shape(LLAMA, TraceShape.of(requests), H100_BYTES, **kw)


# ---------------------------------------------------------------------------------- the engine's shape
def _mixed(n: int) -> list[Request]:
    return [Request(i, 5 + (7 * i) % 37, 3 + (5 * i) % 11) for i in range(n)]


@pytest.mark.parametrize("kw", [{}, {"dense_batch": 96}, {"dense_batch": 64, "max_decode": 16},
                                {"kv_cache_dtype": "fp8"}])
def test_engine_shape_is_the_engines_choice(kw, one_torch_thread):
    """The family's shape gives the dense batch, decode slots, buckets and KV pages Engine chooses (an fp8
    cache included: its bytes per token give this model other decode slots and pages)."""
    from nfsearch.runtime.engine import Engine
    reqs = _mixed(30)
    memory = 320 << 20            # the engine keeps 256 MiB free (engine_memory.SAFETY_BYTES)
    engine = Engine(ENGINE_TINY, device="cpu", dtype="fp32", trace_shape=TraceShape.of(reqs), memory_bytes=memory, **kw)
    shape = engine_shape(load_model_config(ENGINE_TINY), TraceShape.of(reqs), memory, dtype_bytes=4, other_bytes=0,
                         **kw)
    assert (shape.dense_batch, shape.max_decode, shape.num_pages) == (engine.dense_batch, engine.max_decode,
                                                                      engine.num_pages)
    assert list(shape.buckets) == sorted(engine.buckets)


def test_fp8_kv_cache_sizes_the_family_like_the_engine():
    """An fp8 cache: 1 byte per element + a 4-byte scale per (token, kv head) for K and V, 132 bytes a head
    against bf16's 256 on llama-3-8b (head_dim 128): up to 1.94x the pages (a little less: the larger dense
    batch it allows takes more activation memory)."""
    _, bf16 = _shape("E1", 200)
    _, fp8 = _shape("E1", 200, kv_cache_dtype="fp8")
    assert 1.85 < fp8.num_pages / bf16.num_pages <= 256 / 132
    assert fp8.dense_batch > bf16.dense_batch
    with pytest.raises(NfsearchError, match="kv cache dtype"):
        _shape("E1", 20, kv_cache_dtype="fp16")


def test_engine_shape_on_e1_is_the_measured_engines():
    """E1 on an H100: the engine printed dense batch 896, 304 decode rows, 8 buckets, KV ~450k tokens."""
    _, shape = _shape("E1", 2000)
    assert (shape.dense_batch, shape.max_decode, len(shape.buckets)) == (896, 304, 8)
    assert abs(shape.num_pages * shape.page_size / 450_272 - 1) < 0.01


# ---------------------------------------------------------------------------------- bucket coverage
def _check_covering(batch, buckets) -> None:
    shape = (batch.num_tokens, batch.num_decode, batch.num_segments, batch.max_context)
    assert batch.bucket.covers(*shape)
    covering = [b for b in buckets if b.covers(*shape)]
    assert batch.bucket == min(covering)                 # the first in the engine's (sorted) order
    for b in covering:                                   # and none covers it with less in every limit
        assert not (b != batch.bucket and all(x <= y for x, y in zip(vars(b).values(), vars(batch.bucket).values())))


@pytest.mark.parametrize("trace", ["E1", "E2", "E3", "E4"])
@pytest.mark.parametrize("num_pages", [None, 400])
def test_every_batch_gets_the_smallest_covering_bucket(trace, num_pages):
    """Every batch the scheduler forms over the trace (the H100's cache, and a small one: fewer requests at
    once, so smaller batches) lands in a bucket that covers it and is the smallest that does."""
    requests, shape = _shape(trace, 40, num_pages=num_pages)
    seen = set()

    def check(batch, _sched):
        _check_covering(batch, shape.buckets)
        seen.add(batch.bucket)

    run = run_scheduler(requests, shape, LLAMA.max_model_len, on_batch=check)
    assert run.num_finished + run.num_refused == len(requests) and run.num_iterations > 0
    assert len(seen) >= 2                                # more than the top bucket is exercised
    assert sum(h.num_iterations for h in run.hits.values()) == run.num_iterations


def test_the_engine_launches_each_batch_in_the_schedulers_bucket(one_torch_thread):
    """The engine runs each batch with the static buffers of the scheduler's bucket: the smallest covering one."""
    from nfsearch.runtime.engine import Engine
    reqs = _mixed(20)
    engine = Engine(ENGINE_TINY, device="cpu", dtype="fp32", trace_shape=TraceShape.of(reqs), dense_batch=64,
                    max_decode=16)
    launched, launch = [], engine.runner.launch

    def spy(batch, variant):
        launched.append((batch, engine.runner.buffers[batch.bucket]))
        return launch(batch, variant)

    engine.runner.launch = spy
    engine.run(reqs)
    assert len({b.bucket for b, _ in launched}) >= 2
    for batch, buffers in launched:
        _check_covering(batch, engine.buckets)
        b = batch.bucket                     # the static buffers it is packed into have its bucket's shape
        assert buffers.layout.sizes == {"T": b.max_tokens, "B": b.max_decode, "S": b.max_segments,
                                        "L": b.max_decode + b.max_segments}


# ---------------------------------------------------------------------------------- compositions
def test_quantiles_spread_over_the_weights():
    from collections import Counter
    assert quantiles(Counter({1: 1, 2: 1, 3: 2}), 4) == [1, 2, 3, 3]
    assert quantiles(Counter({5: 3}), 2) == [5, 5]
    assert quantiles(Counter(), 3) == [] and quantiles(Counter({1: 1}), 0) == []


def test_a_buckets_composition_keeps_the_means():
    """The bucket's mean batch: mean decode rows and their total context, mean prefill tokens and the
    chunks' attention pairs, within rounding."""
    requests, shape = _shape("E3", 300)
    run = run_scheduler(requests, shape, LLAMA.max_model_len)
    bucket, hits = max(run.hits.items(), key=lambda kv: kv[1].num_prefill_tokens)
    comp = composition(hits, bucket)
    assert len(comp.decode_contexts) == round(hits.mean(hits.num_decode))
    kv = sum(c * w for c, w in hits.decode_contexts.items()) / hits.num_iterations
    assert abs(sum(comp.decode_contexts) / kv - 1) < 0.05
    assert abs(sum(comp.chunk_lens) - hits.mean(hits.num_prefill_tokens)) <= 1
    pairs = sum(w * (n * p + n * (n + 1) // 2) for (n, p), w in hits.chunks.items()) / hits.num_iterations
    got = sum(n * p + n * (n + 1) // 2 for n, p in zip(comp.chunk_lens, comp.prefix_lens))
    assert abs(got / pairs - 1) < 0.02
    assert comp.num_tokens <= bucket.max_tokens and len(comp.chunk_lens) <= bucket.max_segments
    assert composition(BucketHits(), bucket) is None


# ---------------------------------------------------------------------------------- prediction
def test_trace_prediction_weights_buckets_by_iterations():
    a = BucketPrediction(1.0, 1.2, 0.5, 32, None, None, None)     # 32.5 ms, sequential 38.9
    b = BucketPrediction(0.5, 0.5, 0.25, 32, 10.0, 15.0, 700.0)  # 16.25 ms
    p = predict_trace([(10, a), (20, b), (0, a)], num_real_tokens=13_000)
    assert math.isclose(p.gpu_s, (10 * 32.5 + 20 * 16.25) / 1e3)
    assert math.isclose(p.tokens_per_s, 13_000 / p.gpu_s)
    assert math.isclose(p.sequential_gpu_s, (10 * 38.9 + 20 * 16.25) / 1e3)


def test_lm_head_is_its_gemms_roofline():
    from nfsearch.cost import default_profile, make_problem
    from nfsearch.family.predict import lm_head_ms
    from nfsearch.profile import gpu_from_profile
    from nfsearch.specs import Workload
    wl = Workload.from_batch_shape((1024,) * 300)
    profile = default_profile(LLAMA.spec, wl)
    problem = make_problem(LLAMA.spec, wl, profile)
    gpu = gpu_from_profile(profile)
    h, v = 4096, 128256
    want = max(2 * 300 * h * v / (gpu.peak_tflops * 1e9), (2 * (h * v + 300 * h) + 4 * 300 * v) / (gpu.mem_bandwidth_tbps * 1e9))
    assert math.isclose(lm_head_ms(problem, 300), want)
    assert 0.2 < want < 1.0


# ---------------------------------------------------------------------------------- the family file
@pytest.fixture(scope="module")
def small_family():
    """A small trace at a small dense batch: every bucket solves in well under a second."""
    return solve_family("const:48:16", "llama-3-8b", dense_batch=64, num_requests=24, time_limit_s=1.0,
                        num_workers=2)


def test_family_has_one_verified_plan_per_engine_bucket(small_family):
    fam = small_family
    assert [b.bucket for b in fam.buckets] == list(fam.engine.buckets)
    assert fam.engine.dense_batch == 64 and fam.num_iterations == fam.scheduler_run["num_iterations"]
    for b in fam.buckets:
        verify(b.plan)
        assert b.plan.workload.num_tokens == b.composition.num_tokens <= b.bucket.max_tokens
        assert b.prediction.iteration_ms <= b.prediction.sequential_iteration_ms * 1.0001
        assert b.prediction.floor_ms <= b.prediction.iteration_ms * 1.0001
        assert b.is_nominal == (b.num_iterations == 0)
    assert fam.scheduler_run["num_real_tokens"] == 24 * (48 + 16)
    assert fam.prediction.tokens_per_s >= fam.prediction.sequential_tokens_per_s * 0.9999 > 0


def test_family_file_round_trips_and_is_schema_checked(small_family, tmp_path):
    path = tmp_path / "f.family.json"
    artifact.write(small_family, path)
    again = artifact.read(path)
    assert again.to_dict() == json.loads(path.read_text())
    assert again.buckets[0].plan.to_dict() == small_family.buckets[0].plan.to_dict()
    data = json.loads(path.read_text())
    data["buckets"][0]["num_iterations"] = -1
    with pytest.raises(NfsearchError, match="family schema at buckets/0/num_iterations"):
        artifact.from_dict(data)
    data = json.loads(path.read_text())
    del data["buckets"][0]["plan"]["nano_ops"]
    with pytest.raises(NfsearchError, match="bucket 1's plan: does not match the plan schema"):
        artifact.from_dict(data)
    data = json.loads(path.read_text())
    data["engine"]["buckets"][0][0] += 16
    with pytest.raises(NfsearchError, match="not the engine buckets"):
        artifact.from_dict(data)


def test_family_refuses_another_engine(small_family):
    fam, buckets = small_family, list(small_family.engine.buckets)
    fam.check_engine("llama-3-8b", 64, buckets)
    with pytest.raises(NfsearchError, match="made for model llama-3-8b, not llama-3-70b"):
        fam.check_engine("llama-3-70b", 64, buckets)
    with pytest.raises(NfsearchError, match="dense batch 64, the engine has 128"):
        fam.check_engine("llama-3-8b", 128, buckets)
    with pytest.raises(NfsearchError, match="made for buckets"):
        fam.check_engine("llama-3-8b", 64, buckets[1:] + [Bucket(64, 16, 8, 99)])


def test_cli_solve_family_and_simulate_it(tmp_path):
    out = tmp_path / "c.family.json"
    runner = CliRunner()
    res = runner.invoke(main, ["solve", "--family", "--trace", "const:40:8", "--model", "llama-3-8b",
                               "--dense-batch", "64", "--num-requests", "16", "--time-limit", "1",
                               "--kv-cache-dtype", "fp8", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["memory"]["kv_cache_dtype"] == "fp8"
    assert "predicted" in res.output and "tokens/s" in res.output and "solved in" in res.output
    assert res.output.count("/8/") >= 2                 # one table row per bucket
    res = runner.invoke(main, ["simulate", str(out)])
    assert res.exit_code == 0, res.output
    assert "each valid" in res.output and "tokens/s" in res.output
    res = runner.invoke(main, ["solve", "--trace", "E1", "--model", "llama-3-8b"])
    assert res.exit_code == 2 and "--family" in res.output
    res = runner.invoke(main, ["solve", "--kv-cache-dtype", "fp8", "--model", "llama-3-8b", "--workload", "W1"])
    assert res.exit_code == 2 and "--family" in res.output
    res = runner.invoke(main, ["solve", "--family", "--trace", "E1", "--workload", "W1"])
    assert res.exit_code == 2 and "drop --workload" in res.output


@pytest.mark.slow
def test_e1_family_solves_within_two_minutes_on_two_cores():
    """Issue 22/25: a family (one plan per engine bucket) in <= 2 minutes on 2 cores; every plan verifies."""
    began = time.perf_counter()
    fam = solve_family("E1", "llama-3-8b", num_workers=2)
    took = time.perf_counter() - began
    assert took <= 120, f"E1 family took {took:.0f} s"
    assert len(fam.buckets) == 8
    for b in fam.buckets:
        verify(b.plan)
    top = max(fam.buckets, key=lambda b: b.num_iterations)
    assert top.bucket.max_tokens == 896 and top.num_iterations / fam.num_iterations > 0.3
    assert 10_000 < fam.prediction.tokens_per_s < 50_000


# ---------------------------------------------------------------------------------- the engine side
TINY_TRACE = "const:20:6"


@pytest.fixture(scope="module")
def tiny_family_path(tmp_path_factory):
    """A family for the tiny engine model (analytic H100 profile) at the CPU engine's cache size."""
    fam = solve_family(TINY_TRACE, ENGINE_TINY, dense_batch=64, num_requests=12, time_limit_s=1.0, num_workers=2,
                       num_pages=1024)
    path = tmp_path_factory.mktemp("family") / "tiny.family.json"
    artifact.write(fam, path)
    return path


def _tiny_engine(**kw):
    from nfsearch.runtime.engine import Engine
    reqs = load_trace(TINY_TRACE, 12).requests
    return reqs, Engine(ENGINE_TINY, device="cpu", dtype="fp32", trace_shape=TraceShape.of(reqs), **kw)


def test_engine_runs_a_family_bucket_by_bucket(tiny_family_path, one_torch_thread):
    """Each bucket's launches go to the model carrying its plan's kernels; the tokens are the plain
    engine's; the bucket hits the family predicted are the ones the engine forms."""
    from nfsearch.runtime.engine_plans import family_report
    reqs, engine = _tiny_engine(plans=str(tiny_family_path))
    assert engine.dense_batch == 64 and len(engine.bucket_kernels) == len(engine.buckets)
    assert set(engine.runner.bucket_models) == {("plan", b) for b in engine.buckets}
    used, launch = [], engine.runner.launch

    def spy(batch, variant):
        used.append(engine.runner.model_for(variant, batch.bucket) is engine.runner.bucket_models[(variant, batch.bucket)])
        return launch(batch, variant)

    engine.runner.launch = spy
    run = engine.run(reqs)
    assert used and all(used)
    _, plain = _tiny_engine(dense_batch=64, max_decode=engine.max_decode)
    again = plain.run(reqs)
    assert [s.output_ids for s in run.sequences] == [s.output_ids for s in again.sequences]
    report = family_report(engine, run)
    for row in report["buckets"]:
        assert math.isclose(row["predicted_fraction"], row["measured_fraction"])
        assert (row["measured_ms"] is None) == (row["measured_fraction"] == 0)


def test_engine_refuses_a_family_made_for_another_engine(tiny_family_path, small_family, tmp_path, one_torch_thread):
    with pytest.raises(NfsearchError, match="dense batch 64, the engine has 128"):
        _tiny_engine(plans=str(tiny_family_path), dense_batch=128)
    other = tmp_path / "llama.family.json"
    artifact.write(small_family, other)
    with pytest.raises(NfsearchError, match="made for model llama-3-8b, not engine-tiny"):
        _tiny_engine(plans=str(other))


def test_plan_kernels_name_one_impl_per_dense_op(small_family):
    from nfsearch.runtime.engine_plans import DENSE_OPS, plan_kernels
    impls = {op: {"torch": 0, "triton": 0, "tma": 0, "cuda": 0} for op in DENSE_OPS}
    b = small_family.buckets[-1]
    k = plan_kernels(b.plan, b.bucket, impls, {})
    assert set(k.op_impls) == set(DENSE_OPS)
    assert k.op_impls == {op.op: op.impl for op in b.plan.nano_ops if op.op in DENSE_OPS}
    assert k.is_sequential == (len(b.plan.streams) == 1)
    with pytest.raises(NfsearchError, match="is not one the engine has"):
        plan_kernels(b.plan, b.bucket, {op: {"torch": 0} for op in DENSE_OPS} | {"kqv": {}}, {})


def test_bench_cli_takes_plans(tiny_family_path, tmp_path, one_torch_thread):
    res = CliRunner().invoke(main, ["bench", "--model", ENGINE_TINY, "--trace", TINY_TRACE, "--num-requests", "12",
                                    "--device", "cpu", "--plans", str(tiny_family_path), "-o", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    assert "plan family (const:20:6, 12 requests): predicted" in res.output
    assert json.loads((tmp_path / "b.json").read_text())["family"]["buckets"]
    res = CliRunner().invoke(main, ["bench", "--model", ENGINE_TINY, "--trace", TINY_TRACE, "--num-requests", "12",
                                    "--device", "cpu", "--plans", str(tiny_family_path), "--tp", "2"])
    assert res.exit_code == 2 and "one GPU" in res.output
