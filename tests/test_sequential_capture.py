"""A plan that IS the sequential baseline is issued (so captured) exactly as seq-same: the same
launches on one stream, no event waits or records between them, one fork and one join. The CUDA
calls of context.issue are recorded by a fake torch.cuda (no GPU semantics needed)."""

import types

import pytest

torch = pytest.importorskip("torch")

from nfsearch.cost import default_profile, make_problem
from nfsearch.runtime import baselines, context, launch
from nfsearch.search.baselines import equal_split_plan, sequential_plan
from nfsearch.specs import load_model, load_workload


class _Recorder:
    """A fake torch.cuda: streams, events and the stream context, each call appended to `calls`."""

    def __init__(self):
        self.calls, self.current, self._names = [], None, {}

    def name(self, obj) -> str:
        return self._names.setdefault(id(obj), f"{type(obj).__name__}{len(self._names)}")

    def module(self):
        rec = self

        class Event:
            def __init__(self, *a, **kw):
                rec.name(self)

            def record(self, stream=None):
                rec.calls.append(("record", rec.name(self), rec.name(stream)))

        class Stream:
            def __init__(self, *a, **kw):
                self.cuda_stream = id(self)

            def wait_event(self, ev):
                rec.calls.append(("wait", rec.name(self), rec.name(ev)))

        class StreamCtx:
            def __init__(self, s):
                self.s = s

            def __enter__(self):
                rec.current = self.s

            def __exit__(self, *exc):
                rec.current = None

        origin = Stream()
        cuda = types.SimpleNamespace(Event=Event, Stream=Stream, stream=StreamCtx,
                                     current_stream=lambda device=None: origin)
        return types.SimpleNamespace(cuda=cuda, device=torch.device)


class _Model:
    def __init__(self, rec):
        self.rec = rec

    def run(self, bufs, layer, op, a, b, impl, sms):
        self.rec.calls.append(("run", self.rec.name(self.rec.current), layer, op, a, b, impl, sms))


def _issued(monkeypatch, ll) -> list[tuple]:
    rec = _Recorder()
    ctx = context.ExecContext("cpu")
    monkeypatch.setattr(context, "torch", rec.module())
    ctx.is_cuda = True                  # walk the CUDA path of issue() against the fake
    ctx.build = lambda layout: None     # no green contexts: split layouts on plain streams
    context.issue(ctx, _Model(rec), None, ll)
    # stream and event names in order of first use, so two lists compare by structure
    names: dict[str, str] = {}
    return [tuple(names.setdefault(x, f"#{len(names)}") if isinstance(x, str) and x[:5] in ("Strea", "Event")
                  else x for x in call) for call in rec.calls]


@pytest.mark.parametrize("workload", ["W1", "W3"])
def test_a_sequential_plan_is_issued_exactly_as_seq_same(monkeypatch, workload):
    model, w = load_model("llama-3-8b"), load_workload(workload)
    s = sequential_plan(make_problem(model, w, default_profile(model, w), 2))
    plan_ll = launch.build(s, num_sms=132, granularity=8)
    same = baselines.seq_same(s, 132, baselines.plan_impls_of(s))
    plan_calls, same_calls = _issued(monkeypatch, plan_ll), _issued(monkeypatch, same)
    assert plan_calls == same_calls
    kinds = [c[0] for c in plan_calls]
    # one fork (record on the origin, wait on the side stream), the launches, one join: nothing else
    assert kinds == ["record", "wait"] + ["run"] * len(same.launches) + ["record", "wait"]
    assert len({c[1] for c in plan_calls if c[0] == "run"}) == 1


def test_a_split_plan_does_wait_and_record(monkeypatch):
    # the recorder sees cross-stream events where there are some (the test above could not pass vacuously)
    model, w = load_model("llama-3-8b"), load_workload("W2")
    s = equal_split_plan(make_problem(model, w, default_profile(model, w), 2), 2)
    calls = _issued(monkeypatch, launch.build(s, num_sms=132, granularity=8))
    assert sum(c[0] == "wait" for c in calls) > 4 and len({c[1] for c in calls if c[0] == "run"}) > 1
