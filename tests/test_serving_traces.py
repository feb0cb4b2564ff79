"""Traces: E1-E4 and constant traces, synthetic samplers (deterministic, on the published means), JSONL."""

import json

import pytest

from nfsearch.errors import NfsearchError
from nfsearch.serving.traces import Request, load_trace, prompt_ids_for


def test_engine_workloads_e1_e2_constant_at_t0_ignore_eos():
    e1 = load_trace("E1", 5)
    assert e1.name == "E1 const1024x512" and not e1.is_synthetic
    assert e1.requests == [Request(i, 1024, 512, 0.0, None, True) for i in range(5)]
    e2 = load_trace("e2", 3)
    assert {(r.prompt_len, r.output_len) for r in e2.requests} == {(512, 512)}
    assert load_trace("const:7:9", 2).requests[1] == Request(1, 7, 9)


@pytest.mark.parametrize("spec, prompt_mean, output_mean", [
    ("E3", 1155, 211), ("E4", 246, 322), ("splitwise", 1155, 211), ("lmsys", 102, 222), ("sharegpt", 246, 322)])
def test_synthetic_means_match_published_within_a_few_percent(spec, prompt_mean, output_mean):
    trace = load_trace(spec, 2000, seed=7, max_context=8192)
    assert trace.is_synthetic and "synthetic, lengths drawn to match published means" in trace.description
    assert trace.mean_prompt_len == pytest.approx(prompt_mean, rel=0.02)
    assert trace.mean_output_len == pytest.approx(output_mean, rel=0.02)
    lengths = [r.prompt_len for r in trace.requests]
    assert min(lengths) >= 1 and max(lengths) > 2 * prompt_mean          # a spread, not a constant
    assert all(r.prompt_len + r.output_len <= 8192 and r.arrival_s == 0.0 for r in trace.requests)


def test_synthetic_deterministic_in_the_seed():
    assert load_trace("sharegpt", 50, seed=1).requests == load_trace("sharegpt", 50, seed=1).requests
    assert load_trace("sharegpt", 50, seed=1).requests != load_trace("sharegpt", 50, seed=2).requests


def test_constant_trace_longer_than_context_is_kept_for_the_scheduler_to_refuse():
    trace = load_trace("const:4000:200", 2, max_context=4096)
    assert [r.prompt_len + r.output_len for r in trace.requests] == [4200, 4200]


def test_jsonl_lengths_arrivals_and_ids(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"input_len": 5, "output_len": 3, "arrival_s": 2.0},
            {"prompt_len": 2, "output_len": 1, "arrival_s": 0.5, "ignore_eos": False},
            {"prompt_ids": [4, 5, 6], "output_len": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    trace = load_trace(str(path), None)
    assert not trace.is_synthetic and "arrivals from the file" in trace.description
    assert trace.requests == [Request(2, 3, 2, 0.0, (4, 5, 6)), Request(1, 2, 1, 0.5, None, False),
                              Request(0, 5, 3, 2.0)]
    assert len(load_trace(str(path), 2).requests) == 2
    assert prompt_ids_for(trace.requests[0], 100) == [4, 5, 6]
    with pytest.raises(NfsearchError, match="prompt id 6 is outside the model's vocabulary of 6"):
        prompt_ids_for(trace.requests[0], 6)


@pytest.mark.parametrize("line, why", [
    ("{not json", "not JSON"), ("[1, 2]", "expected a JSON object"),
    ('{"output_len": 3}', "prompt_len (or input_len) must be an integer >= 1"),
    ('{"prompt_len": 3, "output_len": 0}', "output_len must be an integer >= 1"),
    ('{"prompt_len": 2.5, "output_len": 1}', "prompt_len"),
    ('{"prompt_len": 2, "output_len": 1, "arrival_s": -1}', "arrival_s"),
    ('{"prompt_len": 2, "output_len": 1, "prompt_ids": [1]}', "prompt_len 2 but 1 prompt_ids")])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, why):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt_len": 4, "output_len": 4}\n' + line + "\n")
    with pytest.raises(NfsearchError) as err:
        load_trace(str(path), 10)
    assert f"{path} line 2: " in str(err.value) and why in str(err.value) and "\n" not in str(err.value)


def test_bad_specs_are_one_line_errors(tmp_path):
    for spec, why in [("nosuch", "unknown trace"), ("const:5", "const:IN:OUT"), ("const:0:4", "const:IN:OUT"),
                      (str(tmp_path / "missing.jsonl"), "cannot read trace")]:
        with pytest.raises(NfsearchError, match=why):
            load_trace(spec, 4)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(NfsearchError, match="no requests"):
        load_trace(str(tmp_path / "empty.jsonl"), 4)


def test_random_prompt_ids_depend_on_seed_and_request():
    r0, r1 = Request(0, 6, 1), Request(1, 6, 1)
    ids = prompt_ids_for(r0, 1000, seed=3)
    assert len(ids) == 6 and all(0 <= t < 1000 for t in ids) and ids == prompt_ids_for(r0, 1000, seed=3)
    assert ids != prompt_ids_for(r1, 1000, seed=3) and ids != prompt_ids_for(r0, 1000, seed=4)
