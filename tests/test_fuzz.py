"""The CLI fuzz in CI (issue 8): a few hundred seeded abuses of `nfsearch`, none may crash or slip through.

The cases and categories are in tests/fuzzcases.py; benchmarks/fuzz.py runs a larger set. Each case
runs in its own process (forked after the imports, or a real interpreter for the `entry` family)
with a timeout, in its own folder.
"""

import os

import pytest

import fuzzcases
from fuzzcases import BAD, VALID, Case, Result, classify, error_format_problem

NUM_RANDOM = 160          # + the fixed cases of every family: ~430 cases, about a minute on 2 cores


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
    fuzzcases.preload()
    work = tmp_path_factory.mktemp("fuzz")
    base, notes = fuzzcases.prepare_base(work / "base")
    assert not notes, notes
    cases = fuzzcases.generate(seed=0, num_random=NUM_RANDOM)
    return fuzzcases.run_cases(cases, work / "cases", jobs=max(2, os.cpu_count() or 2), base=base)


@pytest.mark.slow
def test_fuzz_cli_has_no_failures(fuzz_results):
    summary = fuzzcases.summarize(fuzz_results)
    table = fuzzcases.format_table(summary)
    failing = fuzzcases.format_failures(fuzz_results, limit=40)
    assert summary["total"]["cases"] >= 300, table
    for column in fuzzcases.FAILURES + ("fuzzer-error",):
        assert summary["total"][column] == 0, f"{column}\n{table}\n{failing}"


@pytest.mark.slow
def test_fuzz_covers_valid_and_bad_inputs(fuzz_results):
    """The fuzz judges both sides: valid inputs that must run and bad ones that must be refused."""
    summary = fuzzcases.summarize(fuzz_results)
    assert summary["by_validity"][VALID] >= 40 and summary["by_validity"][BAD] >= 200
    assert {r.case.family for r in fuzz_results} == set(fuzzcases.FAMILIES)
    refused = [r for r in fuzz_results if r.case.validity == BAD and r.rc == 2]
    assert len(refused) >= 0.9 * summary["by_validity"][BAD]


@pytest.mark.slow
def test_generation_is_deterministic():
    a = [(c.family, c.name, c.validity, c.args) for c in fuzzcases.generate(seed=3, num_random=100)]
    b = [(c.family, c.name, c.validity, c.args) for c in fuzzcases.generate(seed=3, num_random=100)]
    c = [(c.family, c.name, c.validity, c.args) for c in fuzzcases.generate(seed=4, num_random=100)]
    assert a == b and a != c


def _result(validity=BAD, rc=2, stderr="nfsearch: error: bad\n", new_files=(), timed_out=False, **case):
    return classify(Result(Case("t", "t", validity, [], **case), rc, "", stderr, 0.0, timed_out, list(new_files)))


def test_classifier_categories():
    assert _result().failures == []
    assert _result(rc=1, stderr="Traceback (most recent call last):\n  x\nValueError: y\n").failures == ["traceback"]
    assert _result(rc=0, stderr="Traceback (most recent call last):\n").failures == ["traceback", "accepted-bad"]
    assert _result(rc=None, timed_out=True).failures == ["hang"]
    assert _result(new_files=["X.png"]).failures == ["partial"]
    assert _result(rc=0, stderr="").failures == ["accepted-bad"]
    assert _result(validity=VALID).failures == ["rejected-good"]
    assert _result(validity=VALID, needs_gpu=True).failures == []
    assert _result(rc=-9).failures == ["traceback"]
    assert _result(rc=1, stderr="", allowed_rcs=(0, 1, 2)).failures == []
    assert _result(stderr="Usage: nfsearch solve\nError: No such option\n").failures == ["error-format"]
    wrong = _result(validity=VALID, rc=0, stderr="", check=lambda out, files, d: "stray file")
    assert wrong.failures == ["wrong-output"]


def test_error_format_rule():
    assert error_format_problem("nfsearch: error: x\n") is None
    assert error_format_problem("  stage 1: ...\nnote: analytic\nnfsearch: error: x\n") is None
    assert error_format_problem("nfsearch: error: x\nmore\n") == "the error line is not the last line"
    assert error_format_problem("") == "0 'nfsearch: error:' lines"
    assert error_format_problem("Usage: x\nnfsearch: error: y\n").startswith("extra stderr line")
