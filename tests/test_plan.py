"""Plan files: byte-identical round trips, schema and structure errors, simulate.verify, and mutations.

The mutation tests change valid plans at random and require that reading + verifying either raises
NfsearchError (one line) or the mutated plan is still valid by an independent check below."""

import copy
import dataclasses
import json
import math
import time

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, TINY_MODEL, TINY_WL, fake_profile
from nfsearch import plan
from nfsearch.errors import NfsearchError
from nfsearch.search.baselines import equal_split_plan, sequential_plan
from nfsearch.cost import make_problem
from nfsearch.simulate import PlanInvalid, replay, verify

SPLIT2 = FIXTURES / "tiny-split2.plan.json"
SEQUENTIAL = FIXTURES / "tiny-sequential.plan.json"
TOL = 1e-4


def _problem(num_layers=2):
    return make_problem(TINY_MODEL, TINY_WL, fake_profile(), num_layers=num_layers)


def _data(path=SPLIT2) -> dict:
    return json.loads(path.read_text())


def _load(data: dict):
    schedule = plan.from_dict(data)
    verify(schedule)
    return schedule


def _op(data, op_id):
    return next(o for o in data["nano_ops"] if o["id"] == op_id)


# ---- round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("path,version", [(SPLIT2, 2), (SEQUENTIAL, 1)])
def test_fixture_round_trip_byte_identical(tmp_path, path, version):
    """A plan writes back the same bytes; a version-1 plan (no nano-op 'after': the sequential
    fixture) loads and writes back as version 2, the same but for the version."""
    schedule = plan.read(path)
    verify(schedule)
    plan.write(schedule, tmp_path / "p.json")
    old = path.read_bytes()
    assert old.startswith(b'{\n "schema_version": %d,' % version)
    assert (tmp_path / "p.json").read_bytes() == old.replace(b'"schema_version": 1', b'"schema_version": 2', 1)
    again = plan.read(tmp_path / "p.json")
    assert again == schedule and all(o.after == () for o in again.nano_ops)


@pytest.mark.parametrize("make", [sequential_plan, lambda p: equal_split_plan(p, 2),
                                  lambda p: equal_split_plan(p, 3, chunk=16)])
def test_generated_plan_round_trip(tmp_path, make):
    schedule = make(_problem())
    verify(schedule)
    plan.write(schedule, tmp_path / "a.json")
    back = plan.read(tmp_path / "a.json")
    verify(back)
    plan.write(back, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert back.nano_batches() == schedule.nano_batches() and back.streams == schedule.streams
    assert len(back.nano_ops) == len(schedule.nano_ops)


def test_fixtures_are_what_handmade_makes():
    assert plan.to_json(equal_split_plan(_problem(), 2)) == SPLIT2.read_text()
    # (the sequential fixture stays a version-1 plan: the same but for the version)
    assert plan.to_json(sequential_plan(_problem(1))) == SEQUENTIAL.read_text().replace(
        '"schema_version": 1', '"schema_version": 2', 1)


def test_stated_times_are_replay():
    schedule = plan.read(SPLIT2)
    spans = replay(schedule, _problem().cost).timeline.by_id()
    for op in schedule.nano_ops:
        assert spans[op.id].start_ms == pytest.approx(op.start_ms, abs=1e-6)
        assert spans[op.id].end_ms == pytest.approx(op.end_ms, abs=1e-6)


def test_write_refuses_invalid_schedule(tmp_path):
    schedule = plan.read(SPLIT2)
    with pytest.raises(NfsearchError, match="fingerprint"):
        plan.PlanProfile("xyz", "fake", "bad")
    # a NaN smuggled past the typed sections' checks is still refused, and nothing is written
    bad = plan.Schedule(schedule.model, schedule.workload, schedule.gpu, schedule.profile, schedule.num_layers,
                        schedule.nano_ops, plan.Predicted(1.0, 0.5, 0.5, 0.1), schedule.solver)
    object.__setattr__(bad.predicted, "bound_ms", float("nan"))
    with pytest.raises(NfsearchError, match="non-finite"):
        plan.write(bad, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(NfsearchError, match="cannot write"):
        plan.write(schedule, tmp_path / "missing-dir" / "p.json")


# ---- schema and structure ---------------------------------------------------------------------

def _drop(d, *path):
    for key in path[:-1]:
        d = d[key]
    del d[path[-1]]


def _set(d, value, *path):
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value


@pytest.mark.parametrize("change,where", [
    (lambda d: _drop(d, "predicted"), "(top)"),
    (lambda d: _drop(d, "nano_ops", 0, "deps"), "nano_ops/0"),
    (lambda d: _drop(d, "model", "hidden_size"), "model"),
    (lambda d: _set(d, "two", "num_layers"), "num_layers"),
    (lambda d: _set(d, 2.0, "num_layers"), "num_layers"),
    (lambda d: _set(d, -1, "nano_ops", 3, "sm_count"), "nano_ops/3/sm_count"),
    (lambda d: _set(d, "96", "nano_ops", 3, "sm_count"), "nano_ops/3/sm_count"),
    (lambda d: _set(d, [0], "nano_ops", 1, "tokens"), "nano_ops/1/tokens"),
    (lambda d: _set(d, "L0.x#0", "nano_ops", 1, "deps"), "nano_ops/1/deps"),
    (lambda d: _set(d, "gpu-ish", "nano_ops", 1, "op_class"), "nano_ops/1/op_class"),
    (lambda d: _set(d, 3, "schema_version"), "schema_version"),
    (lambda d: _set(d, 1, "extra"), "(top)"),
    (lambda d: _set(d, True, "nano_ops", 2, "start_ms"), "nano_ops/2/start_ms"),
    (lambda d: _set(d, [], "nano_ops"), "nano_ops"),
    (lambda d: _set(d, "x", "profile", "fingerprint"), "profile/fingerprint"),
])
def test_schema_violations_one_line(change, where):
    data = _data()
    change(data)
    with pytest.raises(NfsearchError) as err:
        _load(data)
    msg = str(err.value)
    assert "\n" not in msg and "plan schema" in msg and f"at {where}" in msg


@pytest.mark.parametrize("change,match", [
    (lambda d: _op(d, "L0.kqv#0")["deps"].append("L0.nope#0"), "unknown L0.nope#0"),
    (lambda d: _set(d, _op(d, "L0.kqv#0")["order"], "nano_ops", 0, "order"), "issue order|issued before"),
    (lambda d: _op(d, "L0.norm1#0").update(deps=["L0.kqv#0"]), "issued before its dependency"),
    (lambda d: _op(d, "L0.kqv#0").update(id="L0.kqv#7"), "does not match"),
    (lambda d: _op(d, "L0.kqv#1").update(id="L0.kqv#0", index=0), "not unique"),
    (lambda d: _op(d, "L0.kqv#0").update(tokens=[5, 5]), "empty token range"),
    (lambda d: _op(d, "L0.kqv#0").update(end_ms=0.0, start_ms=1.0), "ends before"),
    (lambda d: _op(d, "L0.kqv#0").update(sm_count=101), "asks for 101 SMs, the plan's GPU Fake GPU has 100"),
    # no SM share: only a network nano-op of a copy-engine impl
    (lambda d: _op(d, "L0.kqv#0").update(sm_count=0), "asks for 0 SMs; only network nano-ops of impl ce"),
    (lambda d: _set(d, 1, "num_layers"), "outside the plan's 1 layers"),
    (lambda d: d["model"].update(num_kv_heads=3), "multiple"),
    (lambda d: d["workload"].update(num_decode=0, prefill_lengths=[]), "no tokens"),
])
def test_structure_errors(change, match):
    data = _data()
    change(data)
    with pytest.raises(NfsearchError, match=match) as err:
        _load(data)
    assert "\n" not in str(err.value)


def _v2(d, op_id="L0.norm1#1", after=("L0.decode_attn#1",)):
    """Version 2: `op_id` starts after `after` (nano-ops of other streams that end before it starts)."""
    d["schema_version"] = 2
    _op(d, op_id)["after"] = list(after)


def test_after_round_trips_and_is_checked_against_stated_times(tmp_path):
    data = _data()
    _v2(data)
    schedule = _load(data)
    assert schedule.by_id()["L0.norm1#1"].after == ("L0.decode_attn#1",)
    plan.write(schedule, tmp_path / "p.json")
    again = json.loads((tmp_path / "p.json").read_text())
    assert again["schema_version"] == 2 and _op(again, "L0.norm1#1")["after"] == ["L0.decode_attn#1"]
    assert "after" not in _op(again, "L0.kqv#0")          # left out where empty
    assert plan.read(tmp_path / "p.json") == schedule
    # stated to start before the op it is ordered after ends: verify refuses it
    _op(data, "L0.norm1#1").update(start_ms=0.5, end_ms=0.56)        # (decode_attn#1 ends at 0.90)
    with pytest.raises(PlanInvalid, match="violates its order: L0.norm1#1 starts"):
        _load(data)


@pytest.mark.parametrize("change,match", [
    (lambda d: _v2(d, after=["L0.nope#0"]), "starts after unknown L0.nope#0"),
    (lambda d: _v2(d, after=["L0.kqv#1"]), "issued before L0.kqv#1"),
    (lambda d: _v2(d, after=["L0.rope_append#0"]), "of its own stream"),
    (lambda d: _v2(d, "L0.kqv#0", ["L0.norm1#0"]), "both as a dependency and in 'after'"),
    (lambda d: (_v2(d), d.update(schema_version=1)), "plan schema at"),          # version 1 has no 'after'
    (lambda d: _v2(d, after=["L0.decode_attn#1", "L0.decode_attn#1"]), "plan schema at nano_ops/9/after"),
])
def test_bad_after_refused_one_line(change, match):
    """'after': known nano-ops of other streams, issued earlier, not also deps; version 2 only."""
    data = _data()
    change(data)
    with pytest.raises(NfsearchError, match=match) as err:
        _load(data)
    assert "\n" not in str(err.value)


def test_malformed_plan_file(tmp_path):
    (tmp_path / "p.json").write_text('{"schema_version": 1,')
    with pytest.raises(NfsearchError, match="malformed JSON"):
        plan.read(tmp_path / "p.json")
    (tmp_path / "q.json").write_text("[1, 2]")
    with pytest.raises(NfsearchError, match="JSON object"):
        plan.read(tmp_path / "q.json")
    with pytest.raises(NfsearchError, match="no such file"):
        plan.read(tmp_path / "absent.json")


# ---- verify -----------------------------------------------------------------------------------

def test_verify_accepts_fixtures():
    for path in (SPLIT2, SEQUENTIAL):
        verify(plan.read(path))


def test_verify_dependency_starts_before_dep_ends():
    data = _data(SEQUENTIAL)
    kqv = _op(data, "L0.kqv#0")
    kqv["start_ms"] = 0.0
    with pytest.raises(PlanInvalid, match="L0.kqv#0 starts at 0.0000 ms before L0.norm1#0 ends"):
        _load(data)


def test_verify_two_ops_overlap_on_one_stream():
    data = _data()
    # norm1#1 has no deps; it follows act#0 on the "other" stream (split plans issue batch 0 first)
    a, b = _op(data, "L0.act#0"), _op(data, "L0.norm1#1")
    assert a["stream"] == b["stream"] == "other" and a["order"] < b["order"] and not b["deps"]
    b["start_ms"] = (a["start_ms"] + a["end_ms"]) / 2
    with pytest.raises(PlanInvalid, match="stream other runs L0.norm1#1 before L0.act#0 ends"):
        _load(data)


def _beside_kqv(data, sm_count):
    """Move norm1#1 (no deps) onto its own stream, running beside kqv#0 (96 SMs)."""
    kqv, norm = _op(data, "L0.kqv#0"), _op(data, "L0.norm1#1")
    assert kqv["sm_count"] == 96 and not norm["deps"]
    norm.update(stream="extra", sm_count=sm_count, start_ms=kqv["start_ms"], end_ms=kqv["start_ms"] + 0.0625)
    data["streams"].append("extra")
    return data


def test_verify_sms_over_capacity():
    with pytest.raises(PlanInvalid, match="more than the GPU's 100 SMs when L0.(kqv#0|norm1#1) starts"):
        _load(_beside_kqv(_data(), 36))
    verify(plan.from_dict(_beside_kqv(_data(), 4)))       # 96 + 4 = 100 fits


def test_verify_token_ranges_not_tiling():
    data = _data()
    _op(data, "L0.kqv#1")["tokens"] = [130, 256]            # gap at 128..130 in layer 0
    with pytest.raises(NfsearchError, match="kqv"):
        _load(data)
    data = _data()
    _op(data, "L0.kqv#1")["tokens"] = [128, 250]            # stops short of the domain's end
    with pytest.raises(NfsearchError, match="kqv"):
        _load(data)
    data = _data()
    _op(data, "L0.decode_attn#0")["tokens"] = [0, 200]      # decode attention past the decode tokens
    _op(data, "L0.decode_attn#1")["tokens"] = [200, 256]
    with pytest.raises(NfsearchError, match="decode_attn"):
        _load(data)
    data = _data()
    _op(data, "L1.kqv#0")["tokens"] = [0, 100]              # layer 1 disagrees with layer 0
    with pytest.raises(PlanInvalid, match="L1.kqv#0"):
        _load(data)


def test_verify_missing_data_dependency():
    data = _data()
    o = _op(data, "L0.o#0")
    assert "L0.decode_attn#1" in o["deps"]
    o["deps"].remove("L0.decode_attn#1")
    with pytest.raises(PlanInvalid, match="L0.o#0 needs L0.decode_attn#1"):
        _load(data)


def test_verify_missing_op_and_wrong_class():
    data = _data()
    data["nano_ops"] = [o for o in data["nano_ops"] if o["id"] != "L1.act#0"]
    _op(data, "L1.d#0")["deps"] = []
    with pytest.raises(PlanInvalid, match="differ"):
        _load(data)
    data = _data()
    data["nano_ops"] = [o for o in data["nano_ops"] if o["op"] != "act"]
    for o in data["nano_ops"]:
        o["deps"] = [d for d in o["deps"] if ".act#" not in d]
    with pytest.raises(PlanInvalid, match="missing: \\['act'\\]"):
        _load(data)
    data = _data()
    _op(data, "L0.kqv#0")["op_class"] = "memory"
    with pytest.raises(PlanInvalid, match="class memory"):
        _load(data)


def test_dependency_through_stream_order_is_enough():
    """A data dependency may be implied by stream order (same stream, earlier order)."""
    data = _data(SEQUENTIAL)
    _op(data, "L0.o#0")["deps"] = []
    verify(plan.from_dict(data))


# ---- mutations (hypothesis) -------------------------------------------------------------------

REFERENCE = {p: plan.read(p) for p in (SPLIT2, SEQUENTIAL)}


def _still_valid(schedule: plan.Schedule, ref: plan.Schedule) -> str | None:
    """An independent check that a plan verify accepted really is valid; returns what is wrong."""
    if (schedule.model, schedule.workload, schedule.num_layers, schedule.gpu) != \
            (ref.model, ref.workload, ref.num_layers, ref.gpu):
        return "header changed"
    key = lambda o: (o.id, o.layer, o.op, o.index, o.op_class, o.tokens)   # noqa: E731
    if sorted(map(key, schedule.nano_ops)) != sorted(map(key, ref.nano_ops)):
        return "nano-ops changed"
    by_id = schedule.by_id()
    if any(not isinstance(v, int) or isinstance(v, bool) for o in schedule.nano_ops
           for v in (o.layer, o.index, o.order, o.sm_count, *o.tokens)):
        return "non-integer count"
    if any(not (1 <= o.sm_count <= ref.gpu.num_sms or (o.sm_count == 0 and o.impl in plan.NO_SHARE_IMPLS))
           for o in schedule.nano_ops):
        return "bad sm_count"
    reach = nx.DiGraph()
    reach.add_edges_from((d, o.id) for o in schedule.nano_ops for d in o.deps)
    ordered = sorted(schedule.nano_ops, key=lambda o: o.order)
    for stream in {o.stream for o in ordered}:
        same = [o for o in ordered if o.stream == stream]
        reach.add_edges_from((a.id, b.id) for a, b in zip(same, same[1:]))
        if any(b.start_ms + TOL < a.end_ms for a, b in zip(same, same[1:])):
            return "stream overlap"
    for r in ref.nano_ops:
        for d in r.deps:
            if d not in by_id[r.id].deps and not (d in reach and r.id in reach and nx.has_path(reach, d, r.id)):
                return f"lost dependency {d} -> {r.id}"
    for o in schedule.nano_ops:
        if any(by_id[d].order >= o.order or by_id[d].end_ms > o.start_ms + TOL for d in o.deps):
            return "dependency order/time"
        if o.end_ms < o.start_ms:
            return "negative duration"
        used = sum(p.sm_count for p in schedule.nano_ops if p.start_ms <= o.start_ms < p.end_ms - TOL)
        if used > ref.gpu.num_sms:
            return "SMs over capacity"
    return None


CORRUPT = [None, "x", 1.5, 2.0, -3, True, [], {}, [1, 2, 3]]
FIELDS = ["id", "layer", "op", "index", "op_class", "tokens", "stream", "order", "sm_count", "impl", "deps",
          "start_ms", "end_ms"]


@st.composite
def mutated(draw):
    path = draw(st.sampled_from([SPLIT2, SEQUENTIAL]))
    data = copy.deepcopy(_data_cache[path])
    ops = data["nano_ops"]
    for _ in range(draw(st.integers(1, 2))):
        i = draw(st.integers(0, len(ops) - 1))
        kind = draw(st.sampled_from(["drop_dep", "earlier", "more_sms", "swap_orders", "delete",
                                     "corrupt", "tokens", "stream", "top"]))
        op = ops[i]
        if not all(isinstance(op.get(f), t) for f, t in (("deps", list), ("start_ms", float), ("sm_count", int),
                                                         ("order", int), ("tokens", list))):
            kind = "corrupt"            # an earlier mutation corrupted this op: corrupt it further
        if kind == "drop_dep" and op["deps"]:
            op["deps"].pop(draw(st.integers(0, len(op["deps"]) - 1)))
        elif kind == "earlier":
            op["start_ms"] = max(0.0, op["start_ms"] - draw(st.floats(0.0, 2.0)))
        elif kind == "more_sms":
            op["sm_count"] += draw(st.integers(1, 120))
        elif kind == "swap_orders":
            j = draw(st.integers(0, len(ops) - 1))
            op["order"], ops[j]["order"] = ops[j]["order"], op["order"]
        elif kind == "delete":
            ops.pop(i)
            if not ops:
                return path, data
        elif kind == "corrupt":
            op[draw(st.sampled_from(FIELDS))] = draw(st.sampled_from(CORRUPT))
        elif kind == "tokens":
            j = draw(st.integers(0, len(op["tokens"]) - 1))
            op["tokens"][j] = max(0, op["tokens"][j] + draw(st.integers(-70, 70)))
        elif kind == "stream":
            op["stream"] = draw(st.sampled_from(["main", "compute", "memory", "other", "new"]))
        elif kind == "top":
            field = draw(st.sampled_from(["num_layers", "gpu", "model", "workload", "predicted", "streams",
                                          "nano_batches"]))
            data[field] = draw(st.sampled_from(CORRUPT + [1, 3]))
    return path, data


_data_cache = {p: _data(p) for p in (SPLIT2, SEQUENTIAL)}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_raise_nfsearch_error_or_are_harmless(case):
    path, data = case
    try:
        schedule = _load(data)
    except NfsearchError as exc:
        assert "\n" not in str(exc)
        return
    problem = _problem(REFERENCE[path].num_layers)
    problem_ok = _still_valid(schedule, REFERENCE[path])
    assert problem_ok is None, f"verify accepted an invalid plan: {problem_ok}"
    replay(schedule, problem.cost)          # a plan verify accepts must replay
    assert json.loads(plan.to_json(schedule))["nano_ops"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_json_values_never_traceback(data):
    """Any JSON value in any top-level field: NfsearchError or a valid plan."""
    doc = copy.deepcopy(_data_cache[SPLIT2])
    field = data.draw(st.sampled_from(sorted(doc)))
    doc[field] = data.draw(st.recursive(st.none() | st.booleans() | st.integers(-5, 300) | st.floats() |
                                        st.text(max_size=5),
                                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                            max_size=3),
                                        max_leaves=6))
    try:
        _load(doc)
    except NfsearchError:
        pass


# ---- typed sections ---------------------------------------------------------------------------------

def test_sections_are_typed_and_round_trip():
    schedule = plan.read(SPLIT2)
    assert isinstance(schedule.gpu, plan.PlanGpu) and schedule.gpu.num_sms == 100
    assert isinstance(schedule.profile, plan.PlanProfile) and schedule.profile.source == "fake"
    assert isinstance(schedule.predicted, plan.Predicted) and schedule.predicted.layer_time_ms == pytest.approx(4.424583)
    assert isinstance(schedule.solver, plan.SolverInfo) and schedule.solver.name == "equal-split-2"
    for section in (schedule.gpu, schedule.profile, schedule.predicted, schedule.solver):
        assert type(section).from_dict(section.to_dict()) == section
    assert schedule.solver.to_dict() == {"name": "equal-split-2"}      # unset fields are left out


def test_solver_bound_renamed_and_old_name_still_read():
    golden = json.loads((FIXTURES.parent / "golden" / "W3.plan.json").read_text())
    assert "model_bound_ms" in golden["solver"] and "bound_ms" not in golden["solver"]
    old = {k: v for k, v in golden["solver"].items() if k != "model_bound_ms"}
    old["bound_ms"] = 6.098
    info = plan.SolverInfo.from_dict(old)
    assert info.model_bound_ms == 6.098 and "bound_ms" not in info.to_dict()
    assert info.to_dict()["model_bound_ms"] == 6.098
    with pytest.raises(NfsearchError, match="unknown field"):
        plan.SolverInfo.from_dict({"name": "x", "bogus": 1})


@pytest.mark.parametrize("make,match", [
    (lambda: plan.PlanGpu("", 100, 2), "name"),
    (lambda: plan.PlanGpu("G", 0, 1), "num_sms"),
    (lambda: plan.PlanGpu("G", 10**9, 8), "num_sms"),
    (lambda: plan.PlanGpu("G", 100, 101), "sm_granularity"),
    (lambda: plan.PlanProfile("0" * 16, "guessed", "x"), "source"),
    (lambda: plan.Predicted(math.nan, 1.0, 1.0, 1.0), "makespan_ms"),
    (lambda: plan.Predicted(1.0, math.inf, 1.0, 1.0), "layer_time_ms"),
    (lambda: plan.Predicted(1.0, 1.0, -1.0, 1.0), "sequential_layer_time_ms"),
    (lambda: plan.SolverInfo("x", time_limit_s=math.nan), "time limit"),
    (lambda: plan.SolverInfo("x", seed=2**31), "seed"),
    (lambda: plan.SolverInfo("x", threads=0), "threads"),
    (lambda: plan.SolverInfo("x", gap=math.inf), "gap"),
    (lambda: plan.SolverInfo("x", memory_sms=0), "memory_sms"),
])
def test_section_checks(make, match):
    with pytest.raises(NfsearchError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_sm_grid_includes_the_back_side_of_a_split():
    gpu = plan.PlanGpu("H100", 132, 8)
    assert [s for s in range(1, 133) if gpu.is_on_grid(s)] == sorted(
        {*range(8, 133, 8), *(132 - k for k in range(0, 132, 8))})
    assert gpu.is_on_grid(100) and gpu.is_on_grid(132) and gpu.is_on_grid(4) and not gpu.is_on_grid(33)


def test_runtime_impls_are_known_to_the_plan():
    pytest.importorskip("torch")
    from nfsearch.runtime.kernels import IMPLS
    used = {impl for impls in IMPLS.values() for impl in impls}
    assert used <= plan.RUNTIME_IMPLS <= plan.KNOWN_IMPLS and used
    assert plan.NON_MEASURED_IMPLS <= plan.KNOWN_IMPLS


# ---- bad plans refused on read and by verify -----------------------------------------------------

def _every_op(field, value):
    def change(d):
        for o in d["nano_ops"]:
            o[field] = value
    return change


@pytest.mark.parametrize("change,match", [
    (lambda d: _op(d, "L0.kqv#0").update(start_ms=math.nan), "start_ms must be a finite number"),
    (lambda d: _op(d, "L0.kqv#0").update(end_ms=math.inf), "end_ms must be a finite number"),
    (lambda d: _op(d, "L0.kqv#0").update(start_ms=-1.0), "start_ms"),
    (lambda d: _op(d, "L0.kqv#0").update(end_ms=_op(d, "L0.kqv#0")["start_ms"]), "stated duration of 0 ms"),
    (lambda d: _op(d, "L0.kqv#0").update(impl="nonexistent"), "unknown impl 'nonexistent'"),
    (lambda d: _op(d, "L0.kqv#0").update(sm_count=10**9), "asks for 1000000000 SMs"),
    (lambda d: d["gpu"].update(num_sms=10**9), "num_sms"),
    (lambda d: _op(d, "L0.kqv#0").update(sm_count=35), "not on the GPU's partition grid"),
    (lambda d: _op(d, "L0.kqv#0").update(stream="ghost"), "streams the plan does not list: ghost"),
    (lambda d: _set(d, 10**9, "num_layers"), "num_layers"),
    (lambda d: _set(d, math.nan, "predicted", "makespan_ms"), "makespan_ms"),
    (lambda d: _set(d, math.nan, "solver", "time_limit_s"), "time_limit_s|time limit"),
    (lambda d: _set(d, 2**70, "solver", "seed"), "seed"),
    (lambda d: _set(d, [[0, 100], [100, 256]], "nano_batches", "kqv"), "nano_batches' of op kqv"),
    (lambda d: _set(d, 1, "solver", "bogus"), "solver"),
])
def test_bad_plans_refused_one_line(change, match):
    data = _data()
    change(data)
    began = time.perf_counter()
    with pytest.raises(NfsearchError, match=match) as err:
        _load(data)
    assert "\n" not in str(err.value) and time.perf_counter() - began < 5


def test_absurd_sizes_refused_before_any_graph_is_built():
    data = _data()
    data["num_layers"] = 10**9
    for o in data["nano_ops"]:
        o["layer"] = 0 if o["layer"] == 0 else 10**9 - 1
        o["id"] = f"L{o['layer']}.{o['op']}#{o['index']}"
    began = time.perf_counter()
    with pytest.raises(NfsearchError, match="num_layers"):
        plan.from_dict(data)
    data = _data()
    data["nano_ops"] = data["nano_ops"] * (plan.MAX_NANO_OPS // len(data["nano_ops"]) + 1)
    with pytest.raises(NfsearchError, match="more than the 200000 allowed"):
        plan.from_dict(data)
    assert time.perf_counter() - began < 5


def test_verify_checks_structure_of_schedules_made_in_code():
    """verify is the gate for schedules that never went through a file, too."""
    schedule = plan.read(SPLIT2)
    ops = list(schedule.nano_ops)
    ops[0] = dataclasses.replace(ops[0], sm_count=35)
    with pytest.raises(NfsearchError, match="partition grid"):
        verify(dataclasses.replace(schedule, nano_ops=tuple(ops)))
    ops[0] = dataclasses.replace(schedule.nano_ops[0], end_ms=schedule.nano_ops[0].start_ms)
    with pytest.raises(NfsearchError, match="stated duration"):
        verify(dataclasses.replace(schedule, nano_ops=tuple(ops)))
    with pytest.raises(NfsearchError, match="unknown impl"):
        dataclasses.replace(schedule.nano_ops[0], impl="cuda-magic")
    with pytest.raises(NfsearchError, match="num_layers"):
        dataclasses.replace(schedule, num_layers=10**9)


def test_to_json_refuses_non_finite():
    schedule = plan.read(SPLIT2)
    object.__setattr__(schedule.solver, "gap", math.inf)          # past SolverInfo's own check
    with pytest.raises(NfsearchError, match="non-finite"):
        plan.to_json(schedule)
