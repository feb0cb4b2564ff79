"""Timing rounds rotate the order of the candidates (executor.time_variants, TP time_launch_lists): no
candidate always runs first or last, and every candidate's round runs under the same watch."""

import contextlib

import pytest

torch = pytest.importorskip("torch")

from nfsearch.runtime import executor
from nfsearch.runtime.bench import rotated


def test_rotated_starts_each_round_one_later():
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert rotated(["a", "b", "c"], 5) == ["c", "a", "b"]
    assert rotated([], 3) == []


def _fake_variants(order: list[str]):
    return [executor._Variant(label, lambda label=label: order.append(label), {}) for label in ("torch", "same", "plan")]


def test_time_variants_rotates_and_watches_every_round(monkeypatch):
    # the timer is mocked: each "timed run" is one call of the variant, recording its label
    monkeypatch.setattr(executor, "host_times", lambda fn, iters, warmup: [fn() or 1.0])
    order, watched = [], []

    @contextlib.contextmanager
    def watch(label):
        watched.append(label)
        yield
    with executor.ExecContext("cpu") as ctx:
        variants = _fake_variants(order)
        executor.time_variants(ctx, variants, iters=1, repeats=3, watch=watch)
    rounds = [order[i:i + 3] for i in range(0, 9, 3)]
    assert rounds == [["torch", "same", "plan"], ["same", "plan", "torch"], ["plan", "torch", "same"]]
    assert {r[0] for r in rounds} == {r[-1] for r in rounds} == {"torch", "same", "plan"}
    assert watched == order                     # every variant's round is watched alike, the plan's too
    assert all(len(v.repeats) == 3 for v in variants)


def test_the_run_times_plan_and_baselines_in_rotating_rounds(monkeypatch):
    from nfsearch.cost import make_problem
    from nfsearch.roofline import analytic_profile
    from nfsearch.search.baselines import sequential_plan
    from nfsearch.specs import ModelSpec, Workload, load_gpu
    model, workload = ModelSpec("tiny", 256, 4, 2, 64, 512, 2, 1000), Workload("tiny", 6, 40, (20, 13))
    s = sequential_plan(make_problem(model, workload, analytic_profile(model, workload, load_gpu("h100-sxm")), 2,
                                     allow_extrapolation=True))
    seen = []
    original = executor.time_variants

    def spy(ctx, variants, iters, repeats, watch=None):
        labels = {id(v.run): v.label for v in variants}
        monkeypatch.setattr(executor, "host_times", lambda fn, iters, warmup: [seen.append(labels[id(fn)]) or 1.0])
        return original(ctx, variants, iters, repeats, watch)
    monkeypatch.setattr(executor, "time_variants", spy)
    executor.execute(s, device="cpu", time_on_cpu=True, iters=1, repeats=3, with_compiled=False, with_ceilings=False)
    n = 3
    rounds = [seen[i:i + n] for i in range(0, len(seen), n)]
    assert len(rounds) == 3 and sorted(rounds[0]) == ["plan", "seq-same", "seq-torch"]
    assert [r.index("plan") for r in rounds] == [2, 1, 0]


def test_tp_interleaved_rounds_rotate(monkeypatch):
    from nfsearch.runtime import tp
    order = []
    monkeypatch.setattr(tp, "_replayable", lambda tp_, ctx, model, bufs, ll, use_graph: (
        lambda: order.append(ll), "eager", None, None))
    monkeypatch.setattr(tp, "_times", lambda fn, iters, is_cuda: [fn() or 1.0])

    class Rank:
        device = torch.device("cpu")
    out = tp.time_launch_lists(Rank(), None, None, None, {"a": "a", "b": "b"}, iters=1, repeats=4)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert out["a"]["repeat_ms"] == [1.0] * 4
