"""The command line through click's CliRunner: analyze, profile, simulate, and one-line errors."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import FIXTURES, TINY_MODEL, TINY_WL, fake_profile
from nfsearch import plan
from nfsearch.cli import main
from nfsearch.search.baselines import equal_split_plan, sequential_plan
from nfsearch.cost import default_profile, make_problem
from nfsearch.profile import load
from nfsearch.specs import load_model, load_workload

LLAMA_HF = str(FIXTURES / "hf" / "Meta-Llama-3-8B" / "config.json")
MIXTRAL_HF = str(FIXTURES / "hf" / "Mixtral-8x7B-v0.1" / "config.json")
TINY_PLAN = str(FIXTURES / "tiny-split2.plan.json")


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _fails(result, match: str = ""):
    """Exit 2, exactly one `nfsearch: error:` line (the last on stderr), no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("nfsearch: error:")]
    assert len(errors) == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert match.lower() in errors[0].lower(), errors[0]
    return errors[0]


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


# ---- analyze ------------------------------------------------------------------------------------

def _field(output: str, key: str) -> str:
    return next(line[len(key):].strip() for line in output.splitlines() if line.startswith(key))


def test_analyze_w2():
    out = _ok(_run("analyze", "--model", "llama-3-8b", "--workload", "W2", "--gpu", "h100-sxm")).stdout
    assert float(_field(out, "T_compute").split()[0]) == pytest.approx(1.170, rel=0.01)
    assert float(_field(out, "T_mem").split()[0]) == pytest.approx(1.06, rel=0.03)
    assert float(_field(out, "TR = T_mem / T_compute")) == pytest.approx(0.91, abs=0.02)
    assert float(_field(out, "bound per layer").split()[0]) == pytest.approx(1.170, rel=0.01)
    tps = _field(out, "optimal throughput")
    assert "tokens/s" in tps and int(tps.split()[0].replace(",", "")) == pytest.approx(2048 / 1.1694e-3 / 32,
                                                                                         rel=0.001)
    assert "2048 tokens" in out and "NVIDIA H100" in out


def test_analyze_model_defaults_to_workload_model_and_flags():
    a = _ok(_run("analyze", "--workload", "W1")).stdout
    b = _ok(_run("analyze", "--model", "llama-3-8b", "--decode", "512", "--context", "1024")).stdout
    assert _field(a, "T_mem") == _field(b, "T_mem") and _field(a, "T_compute") == _field(b, "T_compute")
    w4 = _ok(_run("analyze", "--workload", "W4")).stdout
    assert float(_field(w4, "network bytes per layer").split()[0]) > 0
    assert float(_field(w4, "T_net").split()[0]) > 0


@pytest.mark.parametrize("config,bundled", [(LLAMA_HF, "llama-3-8b"), (MIXTRAL_HF, "mixtral-8x7b")])
def test_analyze_hf_config(config, bundled):
    got = _ok(_run("analyze", "--model", config, "--workload", "W2")).stdout
    want = _ok(_run("analyze", "--model", bundled, "--workload", "W2")).stdout
    for key in ("FLOPs per layer", "bytes per layer", "T_compute", "T_mem", "bound per layer"):
        assert _field(got, key) == _field(want, key)


def test_analyze_yaml_model_and_workload():
    out = _ok(_run("analyze", "--model", FIXTURES / "tiny-model.yaml", "--workload",
                   FIXTURES / "tiny-workload.yaml")).stdout
    assert "tiny" in out and "256 tokens" in out


# ---- profile ------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_profile_analytic(tmp_path, suffix):
    out = tmp_path / f"p{suffix}"
    result = _ok(_run("profile", "--analytic", "--model", FIXTURES / "tiny-model.yaml", "--workload",
                      FIXTURES / "tiny-workload.yaml", "-o", out))
    table = load(out)
    assert table.is_analytic and table.meta["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert table.fingerprint() in result.stdout and f"{len(table.rows)} rows" in result.stdout


def test_profile_analytic_llama_w2(tmp_path):
    _ok(_run("profile", "--analytic", "--workload", "W2", "--gpu", "h200", "-o", tmp_path / "p.parquet"))
    table = load(tmp_path / "p.parquet")
    assert table.meta["gpu_key"] == "h200" and table.meta["model"] == "llama-3-8b"
    assert {"kqv", "decode_attn", "prefill_attn", "ug", "d"} <= set(table.rows["op"])


def test_profile_without_analytic_needs_cuda(tmp_path):
    line = _fails(_run("profile", "--workload", "W2", "-o", tmp_path / "p.parquet"), "needs a CUDA GPU")
    assert "nfsearch profile" in line
    assert _files(tmp_path) == []


def test_profile_without_torch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)           # import torch -> ImportError
    _fails(_run("profile", "--workload", "W2", "-o", tmp_path / "p.parquet"), "needs a CUDA GPU")
    assert _files(tmp_path) == []


# ---- simulate -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def w2_plans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plans")
    model, workload = load_model("llama-3-8b"), load_workload("W2")
    problem = make_problem(model, workload, default_profile(model, workload), num_layers=1)
    plan.write(sequential_plan(problem), folder / "seq.json")
    plan.write(equal_split_plan(problem, 2, chunk=128), folder / "split2.json")
    return folder


@pytest.mark.parametrize("name", ["seq", "split2"])
def test_simulate_w2(tmp_path, w2_plans, name):
    result = _ok(_run("simulate", w2_plans / f"{name}.json", "-o", tmp_path / "out"))
    assert _files(tmp_path) == ["out.html", "out.png", "out.trace.json"]
    assert "valid" in result.stdout and "replayed layer time" in result.stdout
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "out.html").read_text()
    trace = json.loads((tmp_path / "out.trace.json").read_text())
    schedule = plan.read(w2_plans / f"{name}.json")
    ids = {e["name"] for e in trace["traceEvents"] if e.get("ph") == "X"} | \
        {e.get("args", {}).get("id") for e in trace["traceEvents"]}
    assert len([e for e in trace["traceEvents"] if e.get("ph") == "X"]) == len(schedule.nano_ops)
    assert ids
    stated = schedule.predicted["layer_time_ms"]
    replayed = float(result.stdout.split("replayed layer time")[1].split()[0])
    assert replayed == pytest.approx(stated, abs=1e-3)


def test_simulate_default_output_beside_plan(tmp_path):
    (tmp_path / "p.json").write_text((FIXTURES / "tiny-split2.plan.json").read_text())
    fake_profile().write(tmp_path / "fake.csv")
    _ok(_run("simulate", tmp_path / "p.json", "--profile", tmp_path / "fake.csv"))
    assert _files(tmp_path) == ["fake.csv", "p.json", "p.sim.html", "p.sim.png", "p.sim.trace.json"]


# ---- errors: exit 2, one line, nothing written ----------------------------------------------------

@pytest.mark.parametrize("args,match", [
    (["analyze", "--model", FIXTURES / "malformed.yaml", "--workload", "W2"], "malformed YAML"),
    (["analyze", "--model", FIXTURES / "malformed.json", "--workload", "W2"], "malformed JSON"),
    (["analyze", "--workload", FIXTURES / "malformed.yaml", "--model", "llama-3-8b"], "malformed YAML"),
    (["analyze", "--model", "gpt-17", "--workload", "W2"], "unknown model 'gpt-17'"),
    (["analyze", "--workload", "W9"], "unknown workload 'W9'"),
    (["analyze", "--workload", "W2", "--gpu", "tpu-v9"], "unknown GPU 'tpu-v9'"),
    (["analyze", "--model", "llama-3-8b"], "no workload"),
    (["analyze", "--decode", "4"], "no model"),
    (["analyze", "--model", "llama-3-8b", "--decode", "4", "--prefill", "5,x"], "--prefill"),
    (["analyze", "--model", "llama-3-8b", "--decode", "4", "--dtype", "fp8"], "dtype"),
    (["analyze", "--model", "/nonexistent/config.json", "--workload", "W2"], "no such file"),
])
def test_bad_specs(args, match):
    _fails(_run(*args), match)


def _bad_plan(tmp_path, change) -> str:
    data = json.loads((FIXTURES / "tiny-split2.plan.json").read_text())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("change,match", [
    (lambda d: d["nano_ops"][3].update(sm_count=0), "plan schema at nano_ops/3/sm_count"),
    (lambda d: d["nano_ops"][3].pop("deps"), "plan schema at nano_ops/3"),
    (lambda d: d.update(num_layers="2"), "plan schema at num_layers"),
    (lambda d: d["nano_ops"][1].update(deps=["L0.kqv#9"]), "unknown L0.kqv#9"),
    (lambda d: d["nano_ops"][1].update(start_ms=0.0), "violates its dependencies"),
    (lambda d: d["nano_ops"][5].update(deps=[]), "violates its dependencies"),
])
def test_simulate_bad_plan(tmp_path, change, match):
    path = _bad_plan(tmp_path, change)
    fake_profile().write(tmp_path / "fake.csv")
    _fails(_run("simulate", path, "--profile", tmp_path / "fake.csv", "-o", tmp_path / "out"), match)
    assert _files(tmp_path) == ["bad.json", "fake.csv"]


def test_simulate_malformed_and_missing_plan(tmp_path):
    (tmp_path / "p.json").write_text('{"nano_ops": [')
    _fails(_run("simulate", tmp_path / "p.json", "-o", tmp_path / "out"), "malformed JSON")
    _fails(_run("simulate", tmp_path / "absent.json", "-o", tmp_path / "out"), "no such file")
    assert _files(tmp_path) == ["p.json"]


def test_simulate_profile_cannot_answer(tmp_path):
    # a fake table with rows for 200 and 256 tokens only: the plan's 64- and 128-token nano-ops miss
    fake_profile(tokens=(200, 256)).write(tmp_path / "tiny.csv")
    line = _fails(_run("simulate", TINY_PLAN, "--profile", tmp_path / "tiny.csv", "-o", tmp_path / "out"),
                  "no profile entry")
    assert "tokens" in line and "SMs" in line
    fake_profile(skip_ops=("decode_attn",)).write(tmp_path / "nodecode.csv")
    _fails(_run("simulate", TINY_PLAN, "--profile", tmp_path / "nodecode.csv", "-o", tmp_path / "out"),
           "decode_attn")
    assert _files(tmp_path) == ["nodecode.csv", "tiny.csv"]


def test_simulate_bad_profile_file(tmp_path):
    (tmp_path / "p.csv").write_text("op,impl\nkqv,x\n")
    _fails(_run("simulate", TINY_PLAN, "--profile", tmp_path / "p.csv", "-o", tmp_path / "out"), "metadata")
    _fails(_run("simulate", TINY_PLAN, "--profile", tmp_path / "absent.csv", "-o", tmp_path / "out"),
           "no such profile")
    assert _files(tmp_path) == ["p.csv"]


def test_unwritable_outputs(tmp_path):
    (tmp_path / "file").write_text("x")
    fake_profile().write(tmp_path / "fake.csv")
    _fails(_run("profile", "--analytic", "--workload", "W2", "-o", tmp_path / "nodir" / "p.csv"), "cannot write")
    _fails(_run("profile", "--analytic", "--workload", "W2", "-o", tmp_path / "file" / "p.csv"), "cannot write")
    _fails(_run("profile", "--analytic", "--workload", "W2", "-o", tmp_path / "p.xlsx"), ".parquet or .csv")
    _fails(_run("simulate", TINY_PLAN, "--profile", tmp_path / "fake.csv", "-o", tmp_path / "nodir" / "out"),
           "cannot write")
    _fails(_run("simulate", TINY_PLAN, "--profile", tmp_path / "fake.csv", "-o", tmp_path / "file" / "out"),
           "cannot write")
    assert _files(tmp_path) == ["fake.csv", "file"]


def test_error_in_a_real_process(tmp_path):
    """python -m nfsearch: one line on stderr, exit 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "nfsearch", "analyze", "--model", "gpt-17", "--workload", "W2"],
                          capture_output=True, text=True, cwd=FIXTURES.parent.parent, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("nfsearch: error:")


def test_tiny_fixture_replays_with_its_profile(tmp_path):
    """The fixture plan replays to its stated times under the fake profile it was made with."""
    fake_profile().write(tmp_path / "fake.parquet")
    result = _ok(_run("simulate", TINY_PLAN, "--profile", tmp_path / "fake.parquet", "-o", tmp_path / "o"))
    assert "note: plan was made with profile" not in result.output
    schedule = make_problem(TINY_MODEL, TINY_WL, fake_profile(), 2)
    assert plan.read(TINY_PLAN).profile["fingerprint"] == schedule.profile.fingerprint()
