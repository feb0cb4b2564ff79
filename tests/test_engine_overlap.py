"""Overlapped plans in the engine (runtime.overlap_program, runtime.engine_overlap; issue 25), on the CPU:
a family whose every bucket splits ops into 2 nano-batches on 3 streams gives the sequential engine's
tokens and logits; the issue order and the waits honour every plan edge and every row hazard (any
order the waits allow gives the same logits); split decode attention reads its own page-table rows."""

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from nfsearch.cost import make_problem
from nfsearch.family import artifact
from nfsearch.family.build import solve_family
from nfsearch.roofline import analytic_profile
from nfsearch.runtime.engine_overlap import OverlappedModel
from nfsearch.runtime.overlap_program import build_program
from nfsearch.runtime.step_inputs import make_step_inputs
from nfsearch.search.baselines import equal_split_plan
from nfsearch.serving.model_config import load_model_config
from nfsearch.serving.traces import load_trace
from nfsearch.specs import load_gpu
from tests.conftest import ENGINE_TINY

TRACE = "const:20:6"
CFG = load_model_config(ENGINE_TINY)


def split_plan(workload, num_batches: int = 2):
    """An interleaved equal-split plan (one stream per op class) of the tiny model for `workload`."""
    problem = make_problem(CFG.spec, workload, analytic_profile(CFG.spec, workload, load_gpu("h100-sxm")), 2)
    return equal_split_plan(problem, num_batches, order="interleaved")


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory):
    """The tiny engine's family (sequential plans: nothing pays on so small a model) and the same
    family with every bucket's plan split in two nano-batches."""
    fam = solve_family(TRACE, ENGINE_TINY, dense_batch=64, num_requests=12, time_limit_s=1.0, num_workers=2,
                       num_pages=1024)
    split = dataclasses.replace(fam, buckets=tuple(dataclasses.replace(b, plan=split_plan(b.plan.workload))
                                                   for b in fam.buckets))
    folder = tmp_path_factory.mktemp("family")
    artifact.write(fam, folder / "seq.json")
    artifact.write(split, folder / "split.json")
    return folder / "seq.json", folder / "split.json"


def _engine(**kw):
    from nfsearch.runtime.engine import Engine, TraceShape
    reqs = load_trace(TRACE, 12).requests
    return reqs, Engine(ENGINE_TINY, device="cpu", dtype="fp32", trace_shape=TraceShape.of(reqs), **kw)


def test_overlapped_family_gives_the_sequential_engines_tokens(family_paths, one_torch_thread):
    seq_path, split_path = family_paths
    reqs, engine = _engine(plans=str(split_path))
    assert all(k.is_overlapped for k in engine.bucket_kernels)
    assert all(isinstance(engine.runner.model_for("plan", b), OverlappedModel) for b in engine.buckets)
    run = engine.run(reqs)
    _, seq = _engine(plans=str(seq_path))
    assert not any(k.is_overlapped for k in seq.bucket_kernels)
    assert [s.output_ids for s in run.sequences] == [s.output_ids for s in seq.run(reqs).sequences]


def _mixed_fields(bucket, page_size: int) -> dict:
    """5 decode requests, then 3 chunks (two with prefixes) starting at row 5, inside the padded decode
    slots: each request on pages of its own."""
    contexts, chunks = (9, 17, 3, 30, 12), ((10, 0), (12, 7), (6, 0))
    f = {k: [] for k in ("input_ids", "prev_rows", "positions", "slot_mapping", "context_lens", "chunk_starts",
                         "chunk_lens", "prefix_lens", "logit_rows", "page_tables")}
    num_pages = -(-bucket.max_context // page_size)

    def request(k: int, first: int, count: int) -> None:
        table = [k * num_pages + p for p in range(num_pages)]
        f["page_tables"].append(table)
        for pos in range(first, first + count):
            f["input_ids"].append((37 * k + pos) % CFG.spec.vocab_size)
            f["prev_rows"].append(-1)
            f["positions"].append(pos)
            f["slot_mapping"].append(table[pos // page_size] * page_size + pos % page_size)
        f["logit_rows"].append(len(f["positions"]) - 1)

    for k, c in enumerate(contexts):
        f["context_lens"].append(c)
        request(k, c - 1, 1)
    for k, (n, prefix) in enumerate(chunks):
        f["chunk_starts"].append(len(f["positions"]))
        f["chunk_lens"].append(n)
        f["prefix_lens"].append(prefix)
        request(len(contexts) + k, prefix, n)
    n = len(f["logit_rows"])
    return f | {"temperature": [0.0] * n, "top_p": [1.0] * n, "top_k": [0] * n, "seed": list(range(n)),
                "sample_step": [0] * n}


@pytest.fixture(scope="module")
def split_engine(family_paths):
    torch.set_num_threads(1)
    _, engine = _engine(plans=str(family_paths[1]))
    bucket = max(engine.buckets)
    step = make_step_inputs(bucket, engine.page_size, "cpu", **_mixed_fields(bucket, engine.page_size))
    return engine, bucket, step


def _logits(engine, model, step) -> torch.Tensor:
    engine.model.kv.copy_(torch.randn(engine.model.kv.shape, generator=torch.Generator().manual_seed(1)))
    return model.logits(step)


def test_mixed_batch_logits_are_the_plain_models(split_engine):
    engine, bucket, step = split_engine
    twin = engine.runner.model_for("plan", bucket)
    assert twin.kv is engine.model.kv and len(twin.program.streams) > 1
    want = _logits(engine, engine.model, step)
    assert torch.allclose(_logits(engine, twin, step), want, rtol=1e-5, atol=1e-5)


def _happens_before(program) -> dict[str, set[str]]:
    """op -> the ops known complete when it starts: its stream's earlier ops and what its waits know."""
    known, last = {}, {}
    for o in program.ops:
        k = set()
        if o.stream in last:
            k |= known[last[o.stream]] | {last[o.stream]}
        for w in o.waits:
            k |= known[w] | {w}
        known[o.id], last[o.stream] = k, o.id
    return known


def test_waits_honour_every_plan_edge_and_hazard(split_engine, monkeypatch):
    engine, bucket, step = split_engine
    plan = engine.family.buckets[-1].plan
    # an order edge of the plan's own (v2 `after`): the first layer-1 GEMM of the compute stream after
    # the last memory-stream op of layer 0
    ops = sorted(plan.nano_ops, key=lambda o: o.order)
    mem = [o for o in ops if o.stream == "memory" and o.layer == 0][-1]
    gemm = next(o for o in ops if o.layer == 1 and o.op == "kqv" and o.order > mem.order)
    plan = dataclasses.replace(plan, nano_ops=tuple(dataclasses.replace(o, after=(mem.id,)) if o is gemm else o
                                                    for o in plan.nano_ops))
    program = build_program(plan, 5, bucket.max_tokens, bucket.max_decode, bucket.max_segments, 132)
    known, position = _happens_before(program), {o.id: k for k, o in enumerate(program.ops)}
    mapped = {(f"L{mem.layer + i}" + mem.id[2:], f"L{gemm.layer + i}" + gemm.id[2:]) for i in range(4)}
    assert mapped <= set(program.plan_edges)
    num_deps = sum(len(o.deps) for o in plan.nano_ops if o.layer == 1)
    assert len(program.plan_edges) >= 4 * num_deps
    for a, b in program.edges:
        assert position[a] < position[b] and a in known[b], (a, b)
    assert any(o.waits for o in program.ops) and len({o.stream for o in program.ops}) == 3
    # the launches the model issues are the program's, in its order
    twin = engine.runner.model_for("plan", bucket)
    issued, run_op = [], OverlappedModel.run_op
    monkeypatch.setattr(OverlappedModel, "run_op", lambda self, op, *a: (issued.append(op.id), run_op(self, op, *a)))
    twin.logits(step)
    assert issued == [o.id for o in twin.program.ops]


def _another_order(program, seed: int):
    """The program's ops in another order its waits and stream order allow (random among those ready)."""
    known, rng = _happens_before(program), random.Random(seed)
    left, done, out = list(program.ops), set(), []
    while left:
        ready = [o for o in left if known[o.id] <= done]
        pick = rng.choice(ready)
        left.remove(pick)
        done.add(pick.id)
        out.append(pick)
    return dataclasses.replace(program, ops=tuple(out))


def test_any_order_the_waits_allow_gives_the_same_logits(split_engine):
    """What streams may do between the waits, done on the CPU: the waits alone must keep the result."""
    engine, bucket, step = split_engine
    twin = engine.runner.model_for("plan", bucket)
    want = _logits(engine, engine.model, step)
    program = twin.program
    try:
        for seed in range(3):
            twin.program = _another_order(program, seed)
            assert [o.id for o in twin.program.ops] != [o.id for o in program.ops]
            assert torch.allclose(_logits(engine, twin, step), want, rtol=1e-5, atol=1e-5), seed
    finally:
        twin.program = program


def test_split_decode_attention_reads_its_page_table_rows(split_engine, monkeypatch):
    engine, bucket, step = split_engine
    twin = engine.runner.model_for("plan", bucket)
    calls, attend = [], twin.decode_attn

    def spy(q, kc, vc, page_tables, context_lens, out, *a, **kw):
        row = (q.data_ptr() - twin.buf["q"].data_ptr()) // (q.stride(0) * q.element_size())
        calls.append((row, q.shape[0], page_tables.clone(), context_lens.clone(), out.data_ptr()))
        return attend(q, kc, vc, page_tables, context_lens, out, *a, **kw)

    monkeypatch.setattr(twin, "decode_attn", spy)
    twin.logits(step)
    per_layer = len(calls) // CFG.spec.num_layers
    assert per_layer == 2 and len(calls) == per_layer * CFG.spec.num_layers
    covered = []
    for row, n, tables, lens, out_ptr in calls:
        assert torch.equal(tables, step.page_tables[row:row + n]) and torch.equal(lens, step.context_lens[row:row + n])
        assert out_ptr == twin.buf["attn"][row].data_ptr()
        covered += range(row, row + n)
    assert sorted(covered[:len(covered) // 2]) == list(range(bucket.max_decode))
    assert calls[0][0] == 0 and 0 < calls[0][1] < bucket.max_decode      # the first nano-batch: real requests


def test_the_gpu_tests_two_bucket_families(one_torch_thread):
    """tests/gpu/test_engine_overlap_gpu.py's fixture families: two buckets, the larger one split (and
    nothing else differs), and on the CPU the same tokens."""
    from nfsearch.runtime.engine import Engine, TraceShape
    folder = Path(ENGINE_TINY).parent
    seq, split = (artifact.read(folder / name) for name in ("two-buckets.family.json", "two-buckets-split.family.json"))
    assert [b.bucket for b in seq.buckets] == [b.bucket for b in split.buckets] and len(seq.buckets) == 2
    assert [len(b.plan.streams) for b in seq.buckets] == [1, 1]
    assert [len(b.plan.streams) for b in split.buckets] == [1, 3] and split.buckets[0].plan == seq.buckets[0].plan
    assert split.buckets[1].plan.to_dict() == split_plan(seq.buckets[1].plan.workload).to_dict()
    reqs = load_trace("const:8:8", 24).requests
    runs = [Engine(ENGINE_TINY, device="cpu", dtype="fp32", trace_shape=TraceShape.of(reqs), num_pages=256,
                   plans=str(folder / name)).run(reqs)
            for name in ("two-buckets.family.json", "two-buckets-split.family.json")]
    assert [s.output_ids for s in runs[0].sequences] == [s.output_ids for s in runs[1].sequences]
