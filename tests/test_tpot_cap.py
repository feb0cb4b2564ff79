"""--max-tpot on the tiny CPU model: the iteration-time model is fitted from timed forwards, a cap
under the uncapped batch's time gives a smaller dense batch whose measured iterations stay under it
(with a tolerance for shared CPU cores), an impossible cap is refused in one line, and the choice
itself follows the model exactly."""

from __future__ import annotations

import pytest
from conftest import ENGINE_TINY as TINY

from nfsearch.errors import NfsearchError
from nfsearch.runtime import tpot_cap
from nfsearch.runtime.engine import Engine, TraceShape
from nfsearch.serving.traces import load_trace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _engine(requests, **kw) -> Engine:
    return Engine(TINY, device="cpu", dtype="fp32", dense_batch=512, max_decode=128,
                  trace_shape=TraceShape.of(requests), **kw)


def test_choose_cap_follows_the_time_model():
    model = tpot_cap.IterationTimeModel(1.0, 0.01, 0.0, 0.1)      # 1 ms + 10 us/token + 100 us/decode row
    cap = tpot_cap.choose_cap(10.0, model, 512, 128, mean_context=100)
    # t tokens with min(128, t) decode rows: 1 + 0.11 t <= 10 -> t <= 81 -> 80 (a multiple of 16)
    assert cap.dense_batch == 80 and cap.max_decode == 80 and cap.predict_ms(80) <= 10.0 < model.predict_ms(96, 0, 96)
    # 32 decode rows measured 3x slower than predicted: the budget for the next batch, 10 / ratio - 1 - 3.2 ms
    # of 10 us tokens, falls from the cap (80) to the floor (16 tokens) as the ratio nears 3
    budgets = [cap.observe(64, 0, 32, 3 * model.predict_ms(64, 0, 32)) for _ in range(30)]
    assert budgets[0] == 80 and budgets[-1] == 16 and budgets == sorted(budgets, reverse=True)
    with pytest.raises(NfsearchError, match="below the shortest iteration"):
        tpot_cap.choose_cap(2.0, model, 512, 128, mean_context=100)


def test_max_tpot_caps_the_dense_batch_and_iterations_stay_under_it():
    requests = load_trace("const:16:16", 32).requests
    uncapped = _engine(requests)
    model = tpot_cap.measure_time_model(uncapped.model, 16, 512, 128, uncapped.max_context, uncapped.device)
    # the model's time for a 48-token batch of decode rows: far under the 512-token batch's
    max_tpot_ms = model.predict_ms(48, 48 * 24, 48)
    capped = _engine(requests, max_tpot_ms=max_tpot_ms)
    assert capped.tpot_cap is not None and "--max-tpot" in capped.describe()
    assert capped.dense_batch < uncapped.dense_batch and max(capped.buckets).max_tokens == capped.dense_batch
    run = capped.run(requests)
    assert all(len(s.output_ids) == 16 for s in run.sequences)
    times = [r.time_ms for r in run.iterations]
    assert all(t > 0 for t in times)
    assert sum(times) / len(times) <= 2.0 * max_tpot_ms + 1.0      # shared cores: a factor 2 of slack


def test_an_impossible_cap_is_refused_in_one_line():
    requests = load_trace("const:16:16", 4).requests
    with pytest.raises(NfsearchError, match="below the shortest iteration") as err:
        _engine(requests, max_tpot_ms=1e-6)
    assert "\n" not in str(err.value)


def test_bench_max_tpot_reports_the_cap_and_refuses_an_impossible_one(tmp_path):
    import json

    from click.testing import CliRunner

    from nfsearch.cli import main
    out = tmp_path / "b.json"
    base = ["bench", "--model", TINY, "--trace", "const:16:8", "--num-requests", "8", "--device", "cpu",
            "--dense-batch", "256"]
    r = CliRunner().invoke(main, [*base, "--max-tpot", "1000", "-o", str(out)])
    assert r.exit_code == 0, r.output
    cap = json.loads(out.read_text())["engine"]["max_tpot"]
    assert cap["max_tpot_ms"] == 1000 and cap["uncapped_dense_batch"] == 256 and cap["dense_batch"] <= 256
    assert "--max-tpot 1000 ms: dense batch" in r.output
    r = CliRunner().invoke(main, [*base, "--max-tpot", "0.000001", "-o", str(tmp_path / "c.json")])
    errors = [line for line in r.output.splitlines() if line.startswith("nfsearch: error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "below the shortest iteration" in errors[0]
    assert not (tmp_path / "c.json").exists()
