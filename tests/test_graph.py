"""The layer graph and its nano-op split: coverage, dependencies by token ranges, cross-layer edges."""

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_MODEL, TINY_MOE
from nfsearch.errors import NfsearchError
from nfsearch.graph import build_layer, first_op, last_op, nano_ranges, read_range, split_layers
from nfsearch.graph import domain_range
from nfsearch.specs import Workload, load_model, load_workload

DENSE_CHAIN = ["norm1", "kqv", "rope_append", "o", "norm2", "ug", "act", "d"]


def _expected_edges(names: set[str]) -> set[tuple[str, str]]:
    """The layer's data flow, written out independently of graph.build_layer."""
    attn = [a for a in ("decode_attn", "prefill_attn") if a in names]
    moe = "router" in names
    ffn = ["router", "expert_ug", "act", "expert_d"] if moe else ["ug", "act", "d"]
    head = ["norm1", "kqv", "rope_append"]
    tail = ["o"] + (["allreduce_o"] if "allreduce_o" in names else []) + ["norm2"] + ffn + \
        (["allreduce_d"] if "allreduce_d" in names else [])
    edges = set(zip(head, head[1:])) | set(zip(tail, tail[1:]))
    edges |= {("rope_append", a) for a in attn} | {(a, "o") for a in attn}
    return edges


@pytest.mark.parametrize("model,wid", [("llama-3-8b", "W1"), ("llama-3-8b", "W2"), ("llama-3-8b", "W3"),
                                       ("llama-3-70b", "W4"), ("llama-2-70b", "W5"), ("mixtral-8x7b", "W2")])
def test_layer_graph_structure(model, wid):
    w = load_workload(wid)
    g = build_layer(load_model(model), w)
    assert nx.is_directed_acyclic_graph(g)
    assert set(g.edges) == _expected_edges(set(g.nodes))
    assert first_op(g) == "norm1"
    assert last_op(g) == ("allreduce_d" if w.tp_degree > 1 else ("expert_d" if "mixtral" in model else "d"))
    assert ("decode_attn" in g) == (w.num_decode > 0)
    assert ("prefill_attn" in g) == (w.num_prefill_tokens > 0)
    if "decode_attn" in g:
        assert g.nodes["decode_attn"]["token_range"] == (0, w.num_decode)
        assert g.nodes["decode_attn"]["op"].op_class == "memory"
    if "prefill_attn" in g:
        assert g.nodes["prefill_attn"]["token_range"] == (w.num_decode, w.num_tokens)
    assert g.nodes["kqv"]["token_range"] == (0, w.num_tokens)


def test_tp_adds_allreduce_ops():
    model = load_model("llama-3-70b")
    base = dict(name="w", num_decode=64, decode_context=512, prefill_lengths=(64,))
    g1 = build_layer(model, Workload(**base, tp_degree=1))
    g2 = build_layer(model, Workload(**base, tp_degree=2))
    assert not any(n.startswith("allreduce") for n in g1)
    assert {"allreduce_o", "allreduce_d"} <= set(g2)
    assert g2.nodes["allreduce_o"]["op"].op_class == "network"
    assert ("o", "allreduce_o") in g2.edges and ("allreduce_o", "norm2") in g2.edges
    # GEMM widths are sharded by TP
    assert g2.nodes["kqv"]["op"].gemm_n * 2 == g1.nodes["kqv"]["op"].gemm_n


def test_moe_has_router_and_experts():
    g = build_layer(load_model("mixtral-8x7b"), load_workload("W2"))
    assert {"router", "expert_ug", "expert_d"} <= set(g) and "ug" not in g and "d" not in g
    assert g.nodes["router"]["op"].gemm_n == 8
    assert ("norm2", "router") in g.edges and ("router", "expert_ug") in g.edges


def test_read_range_causal_prefill():
    w = Workload("w", 10, 100, (20, 30))          # prompts at [10, 30) and [30, 60)
    assert read_range("prefill_attn", 15, 25, w) == (10, 25)
    assert read_range("prefill_attn", 30, 40, w) == (30, 40)
    assert read_range("prefill_attn", 35, 60, w) == (30, 60)
    assert read_range("prefill_attn", 25, 45, w) == (10, 45)   # spans two prompts
    assert read_range("kqv", 15, 25, w) == (15, 25)
    assert read_range("decode_attn", 0, 5, w) == (0, 5)


def test_nano_ranges_rejects_bad_sizes():
    g = build_layer(TINY_MODEL, Workload("w", 8, 64, (8,)))
    with pytest.raises(NfsearchError, match="kqv"):
        nano_ranges(g, {"kqv": (4, 4)})
    with pytest.raises(NfsearchError, match="kqv"):
        nano_ranges(g, {"kqv": (20, -4)})


def _prompt_start(w: Workload, token: int) -> int:
    start = w.num_decode
    for n in w.prefill_lengths:
        if start <= token < start + n:
            return start
        start += n
    raise AssertionError("not a prefill token")


@st.composite
def split_cases(draw):
    num_decode = draw(st.integers(0, 24))
    prompts = draw(st.lists(st.integers(1, 12), max_size=3))
    if num_decode == 0 and not prompts:
        num_decode = 1
    tp = draw(st.sampled_from([1, 2]))
    model = draw(st.sampled_from([TINY_MODEL, TINY_MOE]))
    w = Workload("w", num_decode, 64, tuple(prompts), tp_degree=tp)
    layer = build_layer(model, w)
    sizes = {}
    for name in layer.nodes:
        s, e = layer.nodes[name]["token_range"]
        cuts = sorted(draw(st.sets(st.integers(s + 1, e - 1), max_size=3)) if e - s > 1 else [])
        bounds = [s, *cuts, e]
        sizes[name] = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    return model, w, layer, sizes, draw(st.integers(1, 3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split_cases())
def test_random_splits(case):
    model, w, layer, sizes, num_layers = case
    nano = split_layers(layer, sizes, num_layers, w)
    assert nx.is_directed_acyclic_graph(nano)
    by_op = {}
    for n in nano.nodes:
        by_op.setdefault((n.layer, n.op), []).append(n)
    # every op of every layer is covered exactly, without overlap, in index order
    assert set(by_op) == {(lay, name) for lay in range(num_layers) for name in layer.nodes}
    for (lay, name), nodes in by_op.items():
        nodes.sort(key=lambda n: n.index)
        assert [n.index for n in nodes] == list(range(len(nodes)))
        assert len(nodes) == len(sizes[name])
        s, e = domain_range(layer.nodes[name]["op"], w)
        assert nodes[0].start == s and nodes[-1].end == e
        assert all(a.end == b.start for a, b in zip(nodes, nodes[1:]))
        assert all(n.num_tokens > 0 for n in nodes)
        if name == "decode_attn":
            assert e == w.num_decode
    # an edge exists exactly where the ranges meet (read range for causal prefill attention)
    expected = set()
    pairs = [(lay, u, lay, v) for lay in range(num_layers) for u, v in _expected_edges(set(layer.nodes))]
    pairs += [(lay, last_op(layer), lay + 1, "norm1") for lay in range(num_layers - 1)]
    for lu, u, lv, v in pairs:
        for b in by_op[(lv, v)]:
            rs = _prompt_start(w, b.start) if v == "prefill_attn" else b.start
            for a in by_op[(lu, u)]:
                if a.start < b.end and rs < a.end:
                    expected.add((a, b))
    assert set(nano.edges) == expected
    # each dependant needs at least one producer for each of its inputs
    for n in nano.nodes:
        preds = {p.op for p in nano.predecessors(n)}
        want = {u for u, v in layer.in_edges(n.op)
                if not (n.op == "o" and domain_range(layer.nodes[u]["op"], w)[1] <= n.start)
                and not (n.op == "o" and domain_range(layer.nodes[u]["op"], w)[0] >= n.end)}
        assert want <= preds
        if n.layer > 0 and n.op == "norm1":
            assert any(p.layer == n.layer - 1 and p.op == last_op(layer) for p in nano.predecessors(n))


def test_prefill_nano_op_reads_from_prompt_start():
    w = Workload("w", 4, 64, (8,))        # prompt at [4, 12)
    layer = build_layer(TINY_MODEL, w)
    nano = split_layers(layer, {"rope_append": (4, 4, 4), "prefill_attn": (4, 4)}, 1, w)
    late = next(n for n in nano if n.op == "prefill_attn" and n.index == 1)    # tokens [8, 12)
    assert (late.start, late.end) == (8, 12)
    assert sorted((p.start, p.end) for p in nano.predecessors(late)) == [(4, 8), (8, 12)]
    early = next(n for n in nano if n.op == "prefill_attn" and n.index == 0)
    assert sorted((p.start, p.end) for p in nano.predecessors(early)) == [(4, 8)]
    # decode attention reads only decode tokens
    dec = next(n for n in nano if n.op == "decode_attn")
    assert sorted((p.start, p.end) for p in nano.predecessors(dec)) == [(0, 4)]


def test_cross_layer_edge():
    w = Workload("w", 8, 64, ())
    layer = build_layer(TINY_MODEL, w)
    nano = split_layers(layer, {"d": (4, 4), "norm1": (2, 6)}, 2, w)
    cross = [(u, v) for u, v in nano.edges if u.layer != v.layer]
    assert {(u.id, v.id) for u, v in cross} == {("L0.d#0", "L1.norm1#0"), ("L0.d#0", "L1.norm1#1"),
                                                ("L0.d#1", "L1.norm1#1")}
    assert all(u.layer + 1 == v.layer for u, v in cross)
