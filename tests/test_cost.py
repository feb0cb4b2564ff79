"""The measured cost model: pair-table stretches (derivation, interpolation, range, labels), the
held-out prediction of measured pair splits, and the labelled fallbacks."""

import statistics

import pytest

from nfsearch.calibration import without_calibration
from nfsearch.profile import ProfileTable
from nfsearch.cost import SRC_CURVES, Partner, default_profile, make_problem
from nfsearch.pair_model import SRC_PAIRS, SRC_PAIRS_EDGE, PairModel, hold_out_pairs, predict_pair, side_stretches
from nfsearch.pairs import PairPoint, PairSide, points_from_meta
from nfsearch.roofline import analytic_profile
from nfsearch.specs import load_gpu, load_model, load_workload

GEMM = PairSide("ug", "compute", 2048)
DECODE = PairSide("decode_attn", "memory", 512, 1024)


def _point(sms_a, ca, cb, pa, pb, a=GEMM, b=DECODE):
    return PairPoint(a, b, "x", "y", sms_a, 132 - sms_a, ca, cb, max(ca, cb), pa, pb, pa * 0.8, pb * 0.8)


@pytest.fixture(scope="module")
def w2():
    """The bundled profile's measurements without its calibration: these tests hold the pair model
    to the pair table's own bursts, which the calibration (fitted on whole plan runs) is not."""
    model, workload = load_model("llama-3-8b"), load_workload("W2")
    bundled = default_profile(model, workload)
    return make_problem(model, workload, ProfileTable(bundled.rows, without_calibration(bundled.meta)))


def test_side_stretches_invert_the_pair_replay():
    # A ends first at 1.2 (alone 1.0 -> stretch 1.2); B did 1 - 0.3/0.9 of its work by then
    p = _point(100, 1.2, 1.5, 1.0, 0.9)
    sa, sb = side_stretches(p)
    assert sa == pytest.approx(1.2)
    assert sb == pytest.approx(1.2 / 0.9 / (1 - 0.3 / 0.9))
    assert predict_pair(sa, sb, 1.0, 0.9) == pytest.approx((1.2, 1.5))
    # the other way round, and a partner never speeds an op up (stretch >= 1)
    q = _point(100, 2.0, 0.5, 1.9, 0.55)
    assert side_stretches(q)[1] == 1.0
    assert predict_pair(*side_stretches(_point(60, 2.0, 0.7, 1.6, 0.6)), 1.6, 0.6) == pytest.approx((2.0, 0.7))


def test_pair_model_interpolates_inside_and_refuses_outside():
    points = [_point(92, 1.0, 1.5, 1.0, 0.9), _point(108, 1.2, 1.5, 1.0, 0.9),
              _point(92, 2.0, 3.0, 2.0, 1.8, a=PairSide("ug", "compute", 4096))]
    model = PairModel(points)
    s92 = model.stretch("ug", 2048, 0, 92, "decode_attn", 512, 1024)
    s108 = model.stretch("ug", 2048, 0, 108, "decode_attn", 512, 1024)
    mid = model.stretch("ug", 2048, 0, 100, "decode_attn", 512, 1024)
    assert s92[2] == SRC_PAIRS and s92[0] == pytest.approx(1.0) and s108[0] == pytest.approx(1.2)
    assert mid[0] == pytest.approx(1.1) and mid[1] == pytest.approx(1.0)
    # SM count or own tokens outside the measured ones: no answer (never extrapolated silently)
    assert model.stretch("ug", 2048, 0, 116, "decode_attn", 512, 1024) is None
    assert model.stretch("ug", 1024, 0, 100, "decode_attn", 512, 1024) is None
    assert model.stretch("kqv", 2048, 0, 100, "decode_attn", 512, 1024) is None
    # ... unless asked to clamp, and then labelled
    edge = model.stretch("ug", 2048, 0, 116, "decode_attn", 512, 1024, is_clamped=True)
    assert edge[0] == pytest.approx(1.2) and edge[2] == SRC_PAIRS_EDGE
    # a partner size measured once is taken as measured, and said so
    assert model.stretch("ug", 2048, 0, 100, "decode_attn", 256, 1024)[2] != SRC_PAIRS
    # the reverse orientation (decode beside ug) comes from the same points
    assert model.stretch("decode_attn", 512, 1024, 40, "ug", 2048, 0) is not None


def test_model_reproduces_a_measured_split(w2):
    """ug 2048 tokens beside decode 512 requests at 100+32 SMs, measured: ug ends 1.0965 ms, decode
    1.0745 ms; the cost model (pair stretches x the table's solo times, replayed) comes within 5%."""
    cost = w2.cost
    pa = cost.beside_ms("ug", 2048, 100, (Partner("decode_attn", 512, 32),))
    pb = cost.beside_ms("decode_attn", 512, 32, (Partner("ug", 2048, 100),))
    assert cost.stretch("ug", 2048, 100, Partner("decode_attn", 512, 32))[1] == SRC_PAIRS
    end_a, end_b = predict_pair(pa / cost.solo_ms("ug", 2048, 100), pb / cost.solo_ms("decode_attn", 512, 32),
                                cost.solo_ms("ug", 2048, 100), cost.solo_ms("decode_attn", 512, 32))
    assert end_a == pytest.approx(1.0965, rel=0.05) and end_b == pytest.approx(1.0745, rel=0.05)


@pytest.mark.slow
def test_held_out_pair_splits_predicted(w2):
    """Leave-one-out over the bundled H100 pair table (700 interior splits). Measured when written:
    makespan error median 1.3%, 85% of splits within 5%, p90 6.3%, max 20%; the worse side of each
    split median 4.2%, 57% within 5% (short ops beside long ones carry the largest relative errors;
    the worst splits are where an impl changes between neighbouring SM counts or the table's solo
    time differs from the one measured with the pair, e.g. ug 512 tokens on 92 SMs: 0.252 solo vs
    0.21 in the pair run)."""
    held = hold_out_pairs(w2.profile)
    assert len(held) >= 600
    makespan = [h.makespan_error for h in held]
    assert statistics.median(makespan) <= 0.05
    assert sum(e <= 0.05 for e in makespan) / len(makespan) >= 0.8
    assert statistics.median(h.side_error for h in held) <= 0.05


def test_sources_are_labelled(w2):
    cost = w2.cost
    assert "pair table" in w2.plan_profile().interference and "cross-stream wait" in w2.plan_profile().interference
    # a GEMM of 4096 tokens is outside the measured sizes (512..2048): a labelled fallback
    got = cost.stretch("ug", 4096, 100, Partner("decode_attn", 512, 32))
    assert got[1] != SRC_PAIRS and got[0] >= 1.0
    # decode attention beside an RMSNorm: no family measured; labelled, and not the A100 curves
    got = cost.stretch("decode_attn", 256, 32, Partner("norm2", 1024, 100))
    assert got[1] not in (SRC_PAIRS, SRC_CURVES)
    # an analytic profile has no pairs: the published curves, labelled as such
    model, workload = load_model("llama-3-8b"), load_workload("W2")
    analytic = make_problem(model, workload, analytic_profile(model, workload, load_gpu("h100-sxm")))
    assert analytic.cost.pairs is None
    assert analytic.cost.stretch("decode_attn", 256, 32, Partner("ug", 1024, 100))[1] == SRC_CURVES
    assert "curves" in analytic.plan_profile().interference


def test_stretches_combine_additively(w2):
    cost = w2.cost
    one = Partner("ug", 1024, 100)
    two = Partner("norm2", 1024, 100)
    s1 = cost.stretch("decode_attn", 256, 32, one)[0]
    s2 = cost.stretch("decode_attn", 256, 32, two)[0]
    both = cost.beside_ms("decode_attn", 256, 32, tuple(sorted((one, two))))
    assert both == pytest.approx(cost.solo_ms("decode_attn", 256, 32) * (1 + (s1 - 1) + (s2 - 1)))


def test_bundled_pair_table_is_read(w2):
    assert w2.cost.pairs is not None
    assert w2.cost.pairs.num_points == len(points_from_meta(w2.profile.meta))
