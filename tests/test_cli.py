"""The command line through click's CliRunner: analyze, profile, solve, simulate, tune; help text for
every option; one-line errors (usage and input) with nothing written; where outputs go."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import FIXTURES, TINY_MODEL, TINY_WL, fake_profile

from nfsearch import plan, tune
from nfsearch.cli import main
from nfsearch.cost import default_profile, make_problem
from nfsearch.errors import NfsearchError
from nfsearch.profile import load
from nfsearch.search.baselines import equal_split_plan, sequential_plan
from nfsearch.specs import load_model, load_workload

ROOT = Path(__file__).resolve().parent.parent

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
    # on the bundled profile's measured ceilings (788.2 TFLOP/s, 3.007 TB/s): the bound solve states
    out = _ok(_run("analyze", "--model", "llama-3-8b", "--workload", "W2", "--gpu", "h100-sxm")).stdout
    assert float(_field(out, "T_compute").split()[0]) == pytest.approx(1.153, rel=0.01)
    assert float(_field(out, "T_mem").split()[0]) == pytest.approx(1.06, rel=0.03)
    assert float(_field(out, "TR = T_mem / T_compute")) == pytest.approx(0.91, abs=0.02)
    assert float(_field(out, "roofline bound per layer").split()[0]) == pytest.approx(1.153, rel=0.01)
    assert "788.2 TFLOP/s, 3.007 TB/s" in _field(out, "gpu")
    tps = _field(out, "optimal throughput")
    assert "tokens/s" in tps and int(tps.split()[0].replace(",", "")) == pytest.approx(2048 / 1.1528e-3 / 32,
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
    for key in ("FLOPs per layer", "bytes per layer", "T_compute", "T_mem", "roofline bound per layer"):
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


def test_profile_family_without_cuda_offers_no_analytic_table(tmp_path):
    """--analytic cannot go with --family, so the error does not offer it (plain profile does)."""
    line = _fails(_run("profile", "--family", "tests/fixtures/engine-tiny/two-buckets.family.json",
                       "-o", tmp_path / "p.parquet"), "needs a CUDA GPU")
    assert "nfsearch profile --family" in line and "--analytic" not in line
    assert "--analytic" in _fails(_run("profile", "--workload", "W2", "-o", tmp_path / "p.parquet"), "CUDA")
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
    stated = schedule.predicted.layer_time_ms
    replayed = float(result.stdout.split("replayed layer time")[1].split()[0])
    assert replayed == pytest.approx(stated, abs=1e-3)


def test_simulate_default_output_in_out_folder(tmp_path, monkeypatch):
    """Without -o the outputs go into ./out/ (made on demand), named after the plan."""
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "p.json").write_text((FIXTURES / "tiny-split2.plan.json").read_text())
    fake_profile().write(tmp_path / "fake.csv")
    monkeypatch.chdir(tmp_path)
    result = _ok(_run("simulate", "plans/p.json", "--profile", "fake.csv"))
    assert _files(tmp_path / "out") == ["p.sim.html", "p.sim.png", "p.sim.trace.json"]
    assert _files(tmp_path / "plans") == ["p.json"]
    assert "wrote out/p.sim.html, out/p.sim.png, out/p.sim.trace.json" in result.stdout


def test_simulate_refuses_before_writing_any_output(tmp_path):
    """-o X when X.html is a folder: refused before X.png (written first by the report) exists."""
    fake_profile().write(tmp_path / "fake.csv")
    (tmp_path / "X.html").mkdir()
    _fails(_run("simulate", TINY_PLAN, "--profile", tmp_path / "fake.csv", "-o", tmp_path / "X"), "X.html")
    (tmp_path / "X.html").rmdir()
    (tmp_path / "X.trace.json").mkdir()
    _fails(_run("simulate", TINY_PLAN, "--profile", tmp_path / "fake.csv", "-o", tmp_path / "X"), "X.trace.json")
    assert _files(tmp_path) == ["X.trace.json", "fake.csv"]


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
    (lambda d: d["nano_ops"][3].update(sm_count=-1), "plan schema at nano_ops/3/sm_count"),
    (lambda d: d["nano_ops"][3].update(sm_count=0), "asks for 0 SMs; only network nano-ops"),
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
    # a fake table measured on 50 SMs and more: the plan's 36-SM nano-ops miss (token counts outside a
    # table's grid scale by the roofline's shape; SM counts below it are never made up)
    fake_profile(sms=(50, 70, 96, 100)).write(tmp_path / "tiny.csv")
    line = _fails(_run("simulate", TINY_PLAN, "--profile", tmp_path / "tiny.csv", "-o", tmp_path / "out"),
                  "no profile entry")
    assert "tokens" in line and "36 SMs" in line and "smallest SM count is 50" in line
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
    assert plan.read(TINY_PLAN).profile.fingerprint == schedule.profile.fingerprint()


# ---- usage errors: click's too, one line, exit 2 ----------------------------------------------------

@pytest.mark.parametrize("args,match", [
    (["analyze", "--bogus"], "no such option '--bogus'"),
    (["frobnicate"], "no such command 'frobnicate'"),
    (["simulate"], "missing argument 'plan_path'"),
    (["profile", "--analytic", "--workload", "W2"], "missing option '-o'"),
    (["solve", "--workload", "W2", "--solver", "magic"], "'magic' is not one of"),
    (["solve", "--workload", "W2", "--seed", "x"], "--seed"),
    (["solve", "--workload", "W2", "--seed", str(2**70)], "--seed"),
    (["solve", "--workload", "W2", "--seed", "-1"], "--seed"),
    (["solve", "--workload", "W2", "--threads", "0"], "--threads"),
    (["solve", "--workload", "W2", "--threads", "257"], "--threads"),
    (["solve", "--workload", "W2", "--time-limit", "nan"], "--time-limit"),
    (["solve", "--workload", "W2", "--time-limit", "inf"], "--time-limit"),
    (["solve", "--workload", "W2", "--time-limit", "0"], "--time-limit"),
    (["solve", "--workload", "W2", "--time-limit", "3601"], "--time-limit"),
    (["solve", "--workload", "W2", "--layers", "0"], "--layers"),
    (["solve", "--workload", "W2", "--layers", "1001"], "--layers"),
    (["analyze", "--model", "llama-3-8b", "--decode", "8", "--tp", "65"], "--tp"),
    (["analyze", "--model", "llama-3-8b", "--decode", "8", "--context", "0"], "--context"),
    (["analyze", "--model", "llama-3-8b", "--decode", str(2**20 + 1)], "--decode"),
    (["analyze", "--model", "llama-3-8b", "--decode", "8", "--dtype", "fp8"], "'fp8' is not one of"),
    (["run", "--schedule", TINY_PLAN, "--iters", "0"], "--iters"),
    (["check", "--tolerance", "nan"], "--tolerance"),
    (["tune", "--workload", "W2", "-o", "x.json", "-k", "0"], "-k"),
])
def test_usage_errors_are_one_line(args, match):
    result = _run(*args)
    line = _fails(result, match)
    assert result.output.strip() == line             # nothing else: no usage block, no "Try ... --help"
    assert "Usage:" not in result.output


def test_usage_error_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "nfsearch", "solve", "--seed", "x"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("nfsearch: error:")


def test_bare_command_and_help_are_not_errors():
    assert "Commands:" in _ok(_run()).stdout
    assert _ok(_run("--version")).stdout.startswith("nfsearch, version")


def _commands():
    return sorted(main.commands.items())


def test_every_verb_is_listed_with_help():
    names = {name for name, _ in _commands()}
    assert names == {"analyze", "profile", "solve", "simulate", "check", "run", "compare", "calibrate", "tune",
                     "bench", "serve"}
    for name, command in _commands():
        assert (command.help or "").strip(), name
        out = _ok(_run(name, "--help")).stdout
        assert out.startswith(f"Usage: nfsearch {name}"), out


@pytest.mark.parametrize("name", ["analyze", "profile", "solve", "simulate", "check", "run", "compare", "calibrate",
                                  "tune", "bench", "serve"])
def test_every_option_has_help(name):
    command = main.commands[name]
    options = [p for p in command.params if isinstance(p, click.Option)]
    assert options
    missing = [p.opts[0] for p in options if not (p.help or "").strip()]
    assert missing == [], f"{name}: options without help: {missing}"
    text = _ok(_run(name, "--help")).stdout
    for p in options:
        assert p.opts[-1] in text


# ---- flags a named workload would ignore; prompt lengths -----------------------------------------

@pytest.mark.parametrize("flags,named", [
    (["--tp", "4", "--context", "99999"], ["--tp", "--context"]),
    (["--dtype", "fp16"], ["--dtype"]),
    (["--decode", "8"], ["--decode"]),
    (["--prefill", "512"], ["--prefill"]),
    (["--context", "1024"], ["--context"]),          # even a flag equal to its default is not ignored silently
])
def test_named_workload_refuses_batch_flags(flags, named):
    line = _fails(_run("analyze", "--workload", "W2", *flags), "would be ignored")
    for flag in named:
        assert flag in line


def test_batch_flags_are_applied_without_a_named_workload():
    base = ["analyze", "--model", "llama-3-70b", "--decode", "256", "--prefill", "512"]
    tp1 = _ok(_run(*base)).stdout
    tp4 = _ok(_run(*base, "--tp", "4", "--context", "4096", "--dtype", "fp32")).stdout
    assert "TP=4" in tp4 and "fp32" in tp4 and "TP=1" in tp1
    assert float(_field(tp4, "network bytes per layer").split()[0]) > 0
    assert float(_field(tp1, "network bytes per layer").split()[0]) == 0


@pytest.mark.parametrize("text", ["512,,x", "512,", ",", "0", "-5", "5.5", "1e3", "x", "512;512"])
def test_bad_prefill_is_refused(text):
    _fails(_run("analyze", "--model", "llama-3-8b", "--decode", "4", "--prefill", text), "prefill")


def test_prefill_lengths_are_read_whole():
    out = _ok(_run("analyze", "--model", "llama-3-8b", "--prefill", "512, 256")).stdout
    assert "768 tokens" in out and "0 decode" in out


# ---- solve: where the plan goes, each line once, no ambiguous "bound" -------------------------------

def _solve_tiny(*extra):
    return _run("solve", "--model", FIXTURES / "tiny-model.yaml", "--workload", FIXTURES / "tiny-workload.yaml",
                "--time-limit", "1", *extra)


@pytest.fixture(scope="module")
def fake_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "fake.csv"
    fake_profile().write(path)
    return path


def test_solve_default_output_then_simulate(tmp_path, monkeypatch, fake_csv):
    monkeypatch.chdir(tmp_path)
    result = _ok(_solve_tiny("--profile", fake_csv))
    assert _files(tmp_path) == ["out"] and _files(tmp_path / "out") == ["tiny-tiny-mixed256.json"]
    assert "wrote out/tiny-tiny-mixed256.json" in result.stdout
    _ok(_run("simulate", "out/tiny-tiny-mixed256.json", "--profile", fake_csv))
    assert _files(tmp_path / "out") == ["tiny-tiny-mixed256.json", "tiny-tiny-mixed256.sim.html",
                                        "tiny-tiny-mixed256.sim.png", "tiny-tiny-mixed256.sim.trace.json"]


def test_solve_prints_each_line_once_and_names_each_bound(tmp_path, fake_csv):
    result = _ok(_solve_tiny("--profile", fake_csv, "-o", tmp_path / "p.json"))
    lines = [line.strip() for line in result.output.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), result.output
    assert any(line.startswith("stage 1") for line in lines) and any("stage 2" in line for line in lines)
    bounds = re.findall(r"(\S+) bound\b", result.output)
    assert bounds and set(bounds) <= {"model", "roofline"}, result.output
    assert "roofline bound" in result.stdout
    assert _files(tmp_path) == ["p.json"]


def test_solve_explicit_output_needs_its_folder(tmp_path, fake_csv):
    _fails(_solve_tiny("--profile", fake_csv, "-o", tmp_path / "nodir" / "p.json"), "no directory")
    _fails(_solve_tiny("--profile", fake_csv, "-o", tmp_path / "p.yaml"), ".json")
    (tmp_path / "d.json").mkdir()
    _fails(_solve_tiny("--profile", fake_csv, "-o", tmp_path / "d.json"), "is a directory")
    assert _files(tmp_path) == ["d.json"]


# ---- simulate against another profile ---------------------------------------------------------------

def test_simulate_other_profile_needs_explicit_profile(tmp_path, monkeypatch):
    """TINY_PLAN was made with the fake table; the default (analytic) table of its model is another."""
    monkeypatch.chdir(tmp_path)
    line = _fails(_run("simulate", TINY_PLAN), "name a profile explicitly")
    assert "made with profile" in line
    assert _files(tmp_path) == []
    other = tmp_path / "other.csv"
    _ok(_run("profile", "--analytic", "--model", FIXTURES / "tiny-model.yaml", "--workload",
             FIXTURES / "tiny-workload.yaml", "-o", other))
    result = _ok(_run("simulate", TINY_PLAN, "--profile", other, "--allow-extrapolation", "-o", tmp_path / "x"))
    assert "note: plan was made with profile" in result.output


# ---- interrupts -------------------------------------------------------------------------------------

def test_interrupt_is_one_line_exit_130(tmp_path):
    """Ctrl-C during a real solve: one error line, exit 130, no traceback, no plan written."""
    proc = subprocess.Popen([sys.executable, "-m", "nfsearch", "solve", "--workload", "W2", "--time-limit", "30",
                             "-o", str(tmp_path / "p.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = proc.stderr.readline()               # the first progress line: the search has begun
        assert "stage 1" in first, first
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("nfsearch: error:")]
    assert errors == [err.strip().splitlines()[-1]] and "interrupted" in errors[0]
    assert _files(tmp_path) == []


# ---- tune: the library loop; without CUDA a one-line refusal -------------------------------------

def test_tune_without_cuda_writes_nothing(tmp_path):
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "a.json").write_text((FIXTURES / "tiny-split2.plan.json").read_text())
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    _fails(_run("tune", "--plans", tmp_path / "plans", "-o", tmp_path / "best.json"), "needs a CUDA GPU")
    assert _files(tmp_path) == ["plans"]


def test_tune_candidates_and_pick_best(tmp_path, w2_plans):
    with pytest.raises(NfsearchError, match="no plan JSON"):
        tune.read_candidates(tmp_path)
    with pytest.raises(NfsearchError, match="no such folder"):
        tune.read_candidates(tmp_path / "absent")
    candidates = tune.read_candidates(w2_plans)
    assert [c.name for c in candidates] == ["seq", "split2"]
    seq, split = candidates
    trials = [tune.Trial("seq", seq.schedule, 2.0, {"candidate": "seq"}),
              tune.Trial("split2", split.schedule, 1.5, {"candidate": "split2"}),
              tune.Trial("broken", split.schedule, None, {"candidate": "broken", "error": "mismatch"})]
    result = tune.pick_best(trials)
    assert result.best.name == "split2" and len(result.trials) == 3
    record = tune.write_result(result, tmp_path / "best.json", "nfsearch tune test")
    assert record == tmp_path / "best.tune.json"
    assert plan.read(tmp_path / "best.json").nano_ops == split.schedule.nano_ops
    assert json.loads(record.read_text())["best"] == "split2"
    with pytest.raises(NfsearchError, match="no candidate plan ran correctly"):
        tune.pick_best(trials[2:])
    with pytest.raises(ValueError):
        tune.Trial("nan", seq.schedule, float("nan"), {})


def test_tune_chooses_by_the_candidates_timed_against_each_other(tmp_path, w2_plans):
    from nfsearch.runreport import Timing
    seq, split = tune.read_candidates(w2_plans)
    # each candidate's own run (minutes apart) put split2 ahead; interleaved in one process, seq wins
    trials = [tune.Trial("seq", seq.schedule, 2.0, {"candidate": "seq"}),
              tune.Trial("split2", split.schedule, 1.5, {"candidate": "split2"}),
              tune.Trial("broken", split.schedule, None, {"candidate": "broken", "error": "mismatch"})]
    asked = []

    def interleaved(plans):
        asked.append(sorted(plans))
        return {"seq": Timing("seq", (1.41, 1.40, 1.42), 30, "cuda-graph"),
                "split2": Timing("split2", (1.60, 1.62, 1.61), 30, "cuda-graph")}, []
    got = tune.time_against_each_other(trials, interleaved)
    assert asked == [["seq", "split2"]]                     # only the candidates that ran
    result = tune.pick_best(got)
    assert result.best.name == "seq" and result.best.measured_layer_ms == pytest.approx(1.41)
    assert got[2] is trials[2]
    assert result.best.interleaved["timings"]["split2"]["layer_ms"] == pytest.approx(1.61)
    assert "interleaved" not in result.best.report                 # the run report stays as the run wrote it
    record = json.loads(tune.write_result(result, tmp_path / "best.json", "nfsearch tune test").read_text())
    assert record["best"] == "seq" and record["candidates"][0]["interleaved"]["timings"]["seq"]["layer_ms"] == 1.41
    assert "interleaved" not in record["candidates"][2]
    assert "seq 1.4100 ms [1.4000-1.4200]; split2 1.6100" in tune.interleaved_line(result)
    # a candidate that failed the interleaved check is no longer timed, and says why
    left_out = lambda plans: ({"seq": Timing("seq", (1.4,), 30, "cuda-graph")}, ["split2: left out, output differs"])
    got = tune.time_against_each_other(trials, left_out)
    assert got[1].measured_layer_ms is None and got[1].report["error"] == "split2: left out, output differs"
    # the interleaved timing failing leaves each candidate's own run to choose, noted
    def broken(plans):
        raise NfsearchError("out of memory")
    got = tune.time_against_each_other(trials, broken)
    assert [t.measured_layer_ms for t in got] == [2.0, 1.5, None]
    assert "chosen by each candidate's own run" in got[0].interleaved["note"]
    # one candidate that ran: nothing to time it against
    assert tune.time_against_each_other(trials[1:], interleaved) == trials[1:] and len(asked) == 1


def test_cli_and_tune_do_not_import_torch():
    code = "import sys, nfsearch.cli, nfsearch.tune; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("output,match", [("", "empty"), ("a.json/", "names a folder"),
                                          ("p\udc80.json", "not valid UTF-8")])
def test_bad_output_names_are_refused(tmp_path, monkeypatch, fake_csv, output, match):
    monkeypatch.chdir(tmp_path)
    _fails(_solve_tiny("--profile", fake_csv, "-o", output), match)
    _fails(_run("simulate", TINY_PLAN, "--profile", fake_csv, "-o", output.removesuffix(".json")),
           "empty" if not output else "")
    assert _files(tmp_path) == []


def test_simulate_writes_all_outputs_or_none(tmp_path, monkeypatch, fake_csv):
    """Ctrl-C arrives after the report wrote its PNG and HTML but before the trace (delivered there
    on purpose; test_interrupt_is_one_line_exit_130 sends a real SIGINT): the files made so far and
    the out/ folder made for them are removed."""
    from nfsearch import report
    monkeypatch.chdir(tmp_path)
    real = report.perfetto_trace

    def trace_then_fail(timelines, path):
        assert _files(tmp_path / "out") == ["p.sim.html", "p.sim.png"]
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "perfetto_trace", trace_then_fail)
    (tmp_path / "p.json").write_text((FIXTURES / "tiny-split2.plan.json").read_text())
    result = _run("simulate", "p.json", "--profile", fake_csv)
    assert result.exit_code == 130 and "interrupted" in result.output
    assert _files(tmp_path) == ["p.json"]
    monkeypatch.setattr(report, "perfetto_trace", real)
    _ok(_run("simulate", "p.json", "--profile", fake_csv))
    assert _files(tmp_path / "out") == ["p.sim.html", "p.sim.png", "p.sim.trace.json"]


def test_tune_takes_a_profile_for_solving_or_for_the_plans_predictions(tmp_path):
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "w2.json").write_text((ROOT / "tests/golden/W2.plan.json").read_text())
    # with --plans the profile must be the one the plans were made with (their predictions' table)
    _fails(_run("tune", "--plans", plans, "--profile", ROOT / "profiles/h100-sxm/llama-3-8b.analytic.parquet",
                "-o", tmp_path / "best.json"), "w2: made with profile")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():     # the right profile passes the check and reaches the GPU's refusal
        _fails(_run("tune", "--plans", plans, "--profile", ROOT / "profiles/h100-sxm/llama-3-8b.parquet",
                    "-o", tmp_path / "best.json"), "needs a CUDA GPU")
    _fails(_run("tune", "--model", "llama-3-8b", "--workload", "W1", "--profile", tmp_path / "absent.parquet",
                "-o", tmp_path / "best.json"), "no such profile")
    assert not (tmp_path / "best.json").exists()


def test_profile_refuses_an_opt_in_impl_it_does_not_know(tmp_path):
    out = tmp_path / "p.parquet"
    r = CliRunner().invoke(main, ["profile", "--model", "llama-3-8b", "--workload", "W2", "--opt-in-impls", "tma",
                                  "-o", str(out)])
    assert r.exit_code == 2 and "--opt-in-impls takes cublaslt" in r.output and not out.exists()
    r = CliRunner().invoke(main, ["profile", "--analytic", "--model", "llama-3-8b", "--workload", "W2",
                                  "--opt-in-impls", "cublaslt", "-o", str(out)])
    assert r.exit_code == 2 and "not with --analytic" in r.output and not out.exists()
