"""A fuzzer of the `nfsearch` command line, as a new user would abuse it (issue 8).

Shared by the fast CI test (tests/test_fuzz.py) and the large run (benchmarks/fuzz.py).

Each Case is a command line plus the input files it writes into a fresh folder, and whether that
input is VALID (must exit 0), BAD (must be refused: exit 2 with one `nfsearch: error:` line) or
ANY (the fuzzer cannot tell; only crashes, hangs, stray files and the error format are judged).
Generation is seeded and pure: the same seed gives the same cases. Files that depend on the base
inputs (a plan solved at start, the golden plans, the bundled profile, the HF fixtures) are made by
"makers" run just before the command, inside its own process.

Running: each case runs in its own process with a timeout. By default the process is forked from
this one after the package and its libraries are imported, and runs `python -m nfsearch` through
runpy with fresh stdout/stderr file descriptors: the same code path as a new interpreter without
its ~1 s start-up. `mode="subprocess"` runs a real interpreter instead. The parent is a single
thread that only forks and polls (forking from a threaded parent can deadlock a child), and never
uses pandas/pyarrow itself (their thread pools do not survive a fork); profile tables are written
by the case's own process.

Outcome categories (a case may fall in several):
  traceback      "Traceback (most recent call last)" on stderr, or an exit code not in {0, 2, 130}
                 (a case may allow more, e.g. `check` exits 1 on a regression)
  hang           did not finish within its timeout
  partial        failed (exit != 0) and left a new file behind
  accepted-bad   a BAD input exited 0
  rejected-good  a VALID input exited non-zero (a GPU-only command may exit 2 without CUDA)
  error-format   exit 2, but stderr is not one `nfsearch: error:` line as its last line (lines before
                 it may only be progress lines indented by two spaces or `note:`/`warning:` lines)
  wrong-output   a VALID input exited 0 but its output misses what the case checks (e.g. a flat
                 foo.config.json named after its folder, a stray .partial.csv beside a profile)
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
GOLDEN = REPO / "tests" / "golden"
BUNDLED_PROFILE = REPO / "profiles" / "h100-sxm" / "llama-3-8b.parquet"

VALID, BAD, ANY = "valid", "bad", "any"
FAILURES = ("traceback", "hang", "partial", "accepted-bad", "rejected-good", "error-format", "wrong-output")
DEFAULT_TIMEOUT_S = 20.0
MEMORY_LIMIT_BYTES = 6 << 30          # a runaway case fails with MemoryError instead of eating the box
FUZZER_ERROR_RC = 99                  # the fuzzer itself failed to set a case up

HUGE_DIGITS = "9" * 5000              # a 5,000-digit integer (beyond Python's int-str limit)
SURROGATE = "\udc80"                  # a lone surrogate (what undecodable bytes become in argv)


# ---- cases ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Raw:
    """Literal text spliced into a JSON/YAML document (huge integers, NaN in YAML, escapes)."""
    text: str


@dataclass
class Case:
    family: str
    name: str
    validity: str                       # VALID | BAD | ANY
    args: list[str]
    files: dict = field(default_factory=dict)   # relative path -> bytes | Maker | DIR | ("symlink", target)
    needs_gpu: bool = False             # a VALID command that needs CUDA: exit 2 (one line) is fine here
    allowed_rcs: tuple[int, ...] = (0, 2, 130)
    timeout_s: float = DEFAULT_TIMEOUT_S
    check: Callable | None = None       # check(stdout, new_files, case_dir_name) -> problem or None
    mode: str = "fork"                  # fork | subprocess (a real interpreter)
    entry: str = "module"               # subprocess only: "module" (python -m nfsearch) | "script" (nfsearch)
    interrupt_after_s: float | None = None   # send SIGINT (Ctrl-C) this long after the start

    def command(self, limit: int = 60) -> str:
        parts = []
        for a in ["nfsearch", *self.args]:
            text = a.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
            if len(text) > limit:
                text = text[:limit] + f"...({len(a)} chars)"
            parts.append(shlex.quote(text))
        return " ".join(parts)


DIR = ("dir",)


@dataclass(frozen=True)
class Maker:
    """Makes a file's bytes from the base inputs, in the case's own process."""
    make: Callable[["Base"], bytes]


# ---- base inputs ------------------------------------------------------------------------------------

@dataclass
class Base:
    """Inputs the makers mutate: plan dicts by name, HF configs, model/workload dicts, the profile path."""
    plans: dict[str, dict]
    hf: dict[str, dict]
    folder: Path

    def plan(self, name: str) -> dict:
        return json.loads(json.dumps(self.plans[name]))


def prepare_base(folder: Path, jobs: int = 2) -> tuple[Base, list[str]]:
    """Solve W1 once (--time-limit 1) and load the golden and fixture plans; returns notes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    notes = []
    solve = Case("base", "solve-W1", VALID, ["solve", "--workload", "W1", "--time-limit", "1", "-o",
                                            str(folder / "W1.solved.plan.json")], timeout_s=120)
    [result] = run_cases([solve], folder / "solve", jobs=1)
    plans = {}
    for path in sorted(GOLDEN.glob("*.plan.json")) + sorted(FIXTURES.glob("*.plan.json")):
        plans[path.name.replace(".plan.json", "")] = json.loads(path.read_text())
    solved = folder / "W1.solved.plan.json"
    if result.rc == 0 and solved.is_file():
        plans["solved-W1"] = json.loads(solved.read_text())
    else:
        notes.append(f"could not solve W1 for the base plan (rc {result.rc}: {result.first_error()}); "
                     "using the golden W1 plan in its place")
        plans["solved-W1"] = plans["W1"]
    hf = {p.parent.name: json.loads(p.read_text()) for p in sorted((FIXTURES / "hf").glob("*/config.json"))}
    return Base(plans, hf, folder), notes


# ---- writing documents --------------------------------------------------------------------------

def dump_json(obj, ensure_ascii: bool = True) -> bytes:
    raws: list[str] = []

    def sub(x):
        if isinstance(x, Raw):
            raws.append(x.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        if isinstance(x, list):
            return [sub(v) for v in x]
        return x

    text = json.dumps(sub(obj), indent=1, ensure_ascii=ensure_ascii)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw)
    return text.encode("utf-8", "surrogatepass")


def dump_yaml(obj) -> bytes:
    raws: list[str] = []

    def sub(x):
        if isinstance(x, Raw):
            raws.append(x.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(x, float) and math.isnan(x):
            return sub(Raw(".nan"))
        if isinstance(x, float) and math.isinf(x):
            return sub(Raw(".inf" if x > 0 else "-.inf"))
        if isinstance(x, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in x):
            return sub(Raw(json.dumps(x)))             # YAML double-quoted "\udc80" escapes
        if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 10 ** 4000:
            return sub(Raw(HUGE_DIGITS))
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        if isinstance(x, list):
            return [sub(v) for v in x]
        return x

    text = yaml.safe_dump(sub(obj), sort_keys=False, allow_unicode=True, width=10 ** 6)
    for i, raw in enumerate(raws):
        text = text.replace(f"'@@RAW{i}@@'", raw).replace(f"@@RAW{i}@@", raw)
    return text.encode("utf-8")


def nested_json(depth: int) -> bytes:
    return b'{"model": ' + b"[" * depth + b"]" * depth + b"}"


def nested_yaml(depth: int) -> bytes:
    return b"name: x\nhidden_size: " + b"[" * depth + b"]" * depth + b"\n"


# ---- value pools: (value, validity for an integer field) -----------------------------------------

BAD_INTS = [0, -1, -(2 ** 31), 2 ** 70, Raw(HUGE_DIGITS), 1.5, 4096.7, True, False, None, "abc", "",
            [], {}, float("nan"), float("inf"), Raw("1e400"), SURROGATE, "4096", [4096]]
BAD_FLOATS = [float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e300, Raw("1e400"), "abc", None, True,
              Raw(HUGE_DIGITS), []]
WEIRD_STRINGS = ["", " ", SURROGATE, "x" * 100_000, "Łódź 模型 🚀", "a\nb", "../../etc/passwd", "\x00",
                 "NUL\x00byte", "-", "--help"]
FLAG_BAD_INTS = ["nan", "inf", "-1", str(2 ** 70), HUGE_DIGITS, "1e3", "0x40", "1.5", "", " ", "abc",
                 "x" * 10_000, SURROGATE, "٣", "--", "-0"]
FLAG_BAD_FLOATS = ["nan", "inf", "-inf", "-1", "1e400", HUGE_DIGITS, "", "abc", SURROGATE, "NaN", "-0"]


def _pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


# ---- families ---------------------------------------------------------------------------------------

def _analyze(*extra) -> list[str]:
    return ["analyze", *extra]


SMALL_WL = ["--decode", "64", "--context", "1024", "--prefill", "256"]
SOLVE_FAST = ["--time-limit", "1"]


def fam_usage(rng: random.Random, n: int) -> list[Case]:
    """click usage errors must be one `nfsearch: error:` line too."""
    f = "usage"
    cases = [
        Case(f, "help", VALID, ["--help"]),
        Case(f, "version", VALID, ["--version"]),
        Case(f, "solve-help", VALID, ["solve", "--help"]),
        Case(f, "no-args", ANY, []),
        Case(f, "unknown-command", BAD, ["solv"]),
        Case(f, "unknown-command-unicode", BAD, ["模型"]),
        Case(f, "unknown-option", BAD, ["analyze", "--workload", "W2", "--frobnicate"]),
        Case(f, "unknown-short-option", BAD, ["solve", "-z"]),
        Case(f, "missing-output", ANY, ["solve", "--workload", "W1", *SOLVE_FAST]),  # default: out/
        Case(f, "missing-option-value", BAD, ["analyze", "--workload"]),
        Case(f, "missing-argument", BAD, ["simulate"]),
        Case(f, "extra-argument", BAD, ["analyze", "--workload", "W2", "extra"]),
        Case(f, "bad-choice", BAD, ["solve", "--workload", "W1", "--solver", "glpk", "-o", "p.json"]),
        Case(f, "int-type", BAD, ["analyze", "--decode", "abc", "--model", "llama-3-8b"]),
        Case(f, "float-type", BAD, ["solve", "--workload", "W1", "--time-limit", "fast", "-o", "p.json"]),
        Case(f, "compare-missing", BAD, ["compare", "plan.json"]),
        Case(f, "run-missing-schedule", BAD, ["run"]),
        Case(f, "double-dash", BAD, ["analyze", "--", "--workload", "W2"]),
        Case(f, "option-as-value", BAD, ["analyze", "--workload", "--model"]),
        Case(f, "flag-with-value", BAD, ["solve", "--workload", "W1", "--allow-extrapolation=yes", "-o", "p.json"]),
    ]
    verbs = ["analyze", "profile", "solve", "simulate", "check", "run", "compare", "tune"]
    for i in range(n):
        verb = _pick(rng, verbs)
        junk = _pick(rng, ["--x", "-q", "--" + "a" * rng.randint(1, 300), "--model=", "-o", "--tp=", "---",
                           "--" + SURROGATE, "-" + "模"])
        cases.append(Case(f, f"junk-{verb}-{i}", BAD, [verb, junk]))
    return cases


ANALYZE_FLAGS = {
    "--decode": ["64", "512"],
    "--context": ["512", "2048"],
    "--prefill": ["128,256", "512"],
    "--tp": ["1", "2", "4"],
    "--dtype": ["bf16", "fp16", "fp32"],
    "--gpu": ["h100-sxm", "h200", "a100-sxm"],
}


def fam_flags(rng: random.Random, n: int) -> list[Case]:
    """Bad values of analyze/profile/solve flags."""
    f = "flags"
    cases = [
        Case(f, "analyze-flags-ok", VALID, _analyze("--model", "llama-3-8b", "--decode", "64", "--context", "512",
                                                   "--prefill", "128,256", "--tp", "2", "--dtype", "fp16")),
        Case(f, "analyze-gpu-a100", VALID, _analyze("--workload", "W2", "--gpu", "a100-sxm")),
        Case(f, "analyze-w4", VALID, _analyze("--workload", "W4")),
        Case(f, "analyze-ignored-flags", BAD, _analyze("--tp", "4", "--context", "99999", "--dtype", "fp8",
                                                      "--workload", "W2")),
        Case(f, "analyze-workload-and-prefill", BAD, _analyze("--workload", "W2", "--prefill", "128")),
        Case(f, "analyze-workload-and-tp", BAD, _analyze("--workload", "W2", "--tp", "2")),
        Case(f, "analyze-dtype-fp8", BAD, _analyze("--model", "llama-3-8b", "--decode", "64", "--dtype", "fp8")),
        Case(f, "analyze-tp3-heads", BAD, _analyze("--model", "llama-3-8b", "--decode", "64", "--tp", "3")),
        Case(f, "analyze-tp64-heads", BAD, _analyze("--model", "llama-3-8b", "--decode", "64", "--tp", "64")),
        Case(f, "analyze-no-workload", BAD, _analyze("--model", "llama-3-8b")),
        Case(f, "analyze-decode-0", BAD, _analyze("--model", "llama-3-8b", "--decode", "0")),
        Case(f, "analyze-prefill-semicolon", BAD, _analyze("--model", "llama-3-8b", "--prefill", "512;512")),
        Case(f, "analyze-unknown-model", BAD, _analyze("--model", "gpt-5", "--workload", "W2")),
        Case(f, "analyze-unknown-workload", BAD, _analyze("--workload", "W9")),
        Case(f, "analyze-unknown-gpu", BAD, _analyze("--workload", "W2", "--gpu", "b200")),
        Case(f, "analyze-decode-2**70", BAD, _analyze("--model", "llama-3-8b", "--decode", str(2 ** 70))),
        Case(f, "analyze-context-5000-digits", BAD, _analyze("--model", "llama-3-8b", "--decode", "8",
                                                            "--context", HUGE_DIGITS)),
    ]
    int_flags = ["--decode", "--context", "--tp"]
    for i in range(n):
        kind = rng.random()
        args = ["--model", "llama-3-8b", "--decode", "64", "--context", "512"]
        if kind < 0.45:
            flag = _pick(rng, int_flags)
            value = _pick(rng, FLAG_BAD_INTS)
            validity = ANY if value in ("٣", " ", "-0") and flag != "--tp" else BAD
            if flag == "--context" and value == "-0":
                validity = BAD
            args = _set_flag(args, flag, value)
            name = f"analyze-{flag[2:]}-{i}"
        elif kind < 0.65:
            value = _pick(rng, ["-5", "0", "1e3", "512,abc", "512.5", ",", "512,,512", " 512 ", HUGE_DIGITS,
                                str(2 ** 70), SURROGATE, "٣"])
            validity = ANY if value in (",", "512,,512", " 512 ", "٣") else BAD
            args = args + ["--prefill", value]
            name = f"analyze-prefill-{i}"
        elif kind < 0.8:
            flag = _pick(rng, ["--dtype", "--gpu", "--model", "--workload"])
            value = _pick(rng, WEIRD_STRINGS + ["FP16", "H100-SXM", "w2", "int8"])
            validity = ANY if value in ("FP16", "H100-SXM", "w2") else BAD
            if flag == "--workload":
                args = ["--workload", value]
            else:
                args = _set_flag(args, flag, value)
            name = f"analyze-{flag[2:]}-{i}"
        else:
            flag = _pick(rng, list(ANALYZE_FLAGS))
            args = _set_flag(args, flag, _pick(rng, ANALYZE_FLAGS[flag]))
            if flag == "--tp":
                args = _set_flag(args, "--model", "llama-3-70b")
            validity = VALID
            name = f"analyze-ok-{flag[2:]}-{i}"
        cases.append(Case(f, name, validity, _analyze(*args)))
    return cases


def _set_flag(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


def fam_solve_flags(rng: random.Random, n: int) -> list[Case]:
    f = "solve-flags"
    base = ["solve", "--workload", "W1", "--time-limit", "1", "-o", "p.json"]
    cases = [
        Case(f, "solve-W1-ok", VALID, list(base)),
        Case(f, "solve-small-ok", VALID, ["solve", "--model", "llama-3-8b", *SMALL_WL, *SOLVE_FAST, "-o", "p.json"]),
        Case(f, "solve-allow-extrapolation-W2", VALID, ["solve", "--workload", "W2", "--allow-extrapolation",
                                                       *SOLVE_FAST, "-o", "p.json"], timeout_s=40),
        Case(f, "solve-seed-2**70", BAD, _set_flag(base, "--seed", str(2 ** 70))),
        Case(f, "solve-time-limit-nan", BAD, _set_flag(base, "--time-limit", "nan")),
        Case(f, "solve-time-limit-inf", ANY, _set_flag(base, "--time-limit", "inf")),
        Case(f, "solve-time-limit-neg", BAD, _set_flag(base, "--time-limit", "-1")),
        Case(f, "solve-layers-0", BAD, _set_flag(base, "--layers", "0")),
        Case(f, "solve-layers-1e9", BAD, _set_flag(base, "--layers", str(10 ** 9))),
        Case(f, "solve-threads-neg", BAD, _set_flag(base, "--threads", "-1")),
        Case(f, "solve-chunk-0", BAD, _set_flag(base, "--chunk", "0")),
        Case(f, "solve-layers-3", VALID, _set_flag(base, "--layers", "3")),
        Case(f, "solve-seed-7", VALID, _set_flag(base, "--seed", "7")),
    ]
    pools = {
        "--seed": (["-1", "2147483648"], [str(2 ** 70), HUGE_DIGITS, "nan", "1.5", ""]),
        "--threads": (["0", "1", "64"], ["-1", str(2 ** 70), str(2 ** 40), "nan", ""]),
        "--time-limit": (["0", "1e-9", "0.5"], FLAG_BAD_FLOATS),
        "--layers": (["1", "4"], ["0", "-1", str(10 ** 9), str(2 ** 70), "nan"]),
        "--chunk": (["1", "64", "100000"], ["0", "-128", str(2 ** 70), "nan"]),
        "--solver": (["cpsat", "auto"], ["gurobi2", "", SURROGATE]),
    }
    for i in range(n):
        flag = _pick(rng, list(pools))
        anys, bads = pools[flag]
        if rng.random() < 0.35:
            value, validity = _pick(rng, anys), ANY
        else:
            value, validity = _pick(rng, bads), BAD
        if flag == "--time-limit" and value in ("1e-9", "0", "0.5"):
            validity = ANY
        if flag == "--solver" and value in ("cpsat", "auto"):
            validity = VALID
        cases.append(Case(f, f"solve{flag[1:]}-{i}", validity, _set_flag(base, flag, value), timeout_s=40))
    return cases


def fam_outputs(rng: random.Random, n: int) -> list[Case]:
    """Output paths that are folders, in missing folders, with wrong suffixes or odd names."""
    f = "outputs"
    solve = ["solve", "--workload", "W1", *SOLVE_FAST, "-o"]
    plan = {"plan.json": Maker(lambda b: dump_json(b.plan("solved-W1")))}
    cases = [
        Case(f, "solve-o-is-dir", BAD, solve + ["out.json"], files={"out.json": DIR}),
        Case(f, "solve-o-missing-dir", BAD, solve + ["missing/out.json"]),
        Case(f, "solve-o-txt", BAD, solve + ["out.txt"]),
        Case(f, "solve-o-empty", BAD, solve + [""]),
        Case(f, "solve-o-unicode", VALID, solve + ["plän 模型.json"]),
        Case(f, "solve-o-surrogate", ANY, solve + [f"p{SURROGATE}.json"]),
        Case(f, "solve-o-over-input-dir", BAD, solve + ["sub"], files={"sub": DIR}),
        Case(f, "simulate-o-html-dir", BAD, ["simulate", "plan.json", "-o", "X"], files={**plan, "X.html": DIR}),
        Case(f, "simulate-o-png-dir", BAD, ["simulate", "plan.json", "-o", "X"], files={**plan, "X.png": DIR}),
        Case(f, "simulate-o-trace-dir", BAD, ["simulate", "plan.json", "-o", "X"],
             files={**plan, "X.trace.json": DIR}),
        Case(f, "simulate-o-missing-dir", BAD, ["simulate", "plan.json", "-o", "nope/X"], files=plan),
        Case(f, "simulate-o-ok", VALID, ["simulate", "plan.json", "-o", "X"], files=plan),
        Case(f, "simulate-default-out", VALID, ["simulate", "plan.json"], files=plan),
        Case(f, "simulate-o-unicode", VALID, ["simulate", "plan.json", "-o", "模型 x"], files=plan),
        Case(f, "simulate-o-surrogate", ANY, ["simulate", "plan.json", "-o", f"x{SURROGATE}"], files=plan),
        Case(f, "profile-o-dir", BAD, ["profile", "--analytic", "--workload", "W1", "-o", "p.parquet"],
             files={"p.parquet": DIR}),
        Case(f, "profile-o-txt", BAD, ["profile", "--analytic", "--workload", "W1", "-o", "p.txt"]),
        Case(f, "profile-o-missing-dir", BAD, ["profile", "--analytic", "--workload", "W1", "-o", "no/p.csv"]),
        Case(f, "compare-o-dir", BAD, ["compare", "plan.json", "m.json", "-o", "c.json"],
             files={**plan, "m.json": Maker(lambda b: dump_json(measured_from_plan(b.plan("solved-W1")))),
                    "c.json": DIR}),
        Case(f, "simulate-input-dir", BAD, ["simulate", "plan.json"], files={"plan.json": DIR}),
        Case(f, "simulate-input-missing", BAD, ["simulate", "nothere.json"]),
        Case(f, "simulate-input-devnull", BAD, ["simulate", "/dev/null"]),
        Case(f, "simulate-input-symlink-loop", BAD, ["simulate", "loop.json"], files={"loop.json": ("symlink", "loop.json")}),
        Case(f, "simulate-profile-dir", BAD, ["simulate", "plan.json", "--profile", "p.csv"],
             files={**plan, "p.csv": DIR}),
        Case(f, "analyze-model-dir", BAD, _analyze("--model", "m.yaml", "--workload", "W2"), files={"m.yaml": DIR}),
        Case(f, "analyze-workload-dir", BAD, _analyze("--workload", "w.yaml"), files={"w.yaml": DIR}),
        Case(f, "analyze-model-symlink-loop", BAD, _analyze("--model", "m.json", "--workload", "W2"),
             files={"m.json": ("symlink", "m.json")}),
        Case(f, "solve-profile-missing", BAD, solve[:-1] + ["--profile", "nope.parquet", "-o", "p.json"]),
    ]
    for i in range(n):
        name = _pick(rng, ["a.json", "a.JSON", "a.json.", ".json", "a.json/", "a" * 300 + ".json",
                           "dir/", " .json", "a\n.json", "-.json"])
        validity = ANY if name in (".json", " .json", "a\n.json", "-.json", "a.JSON") else BAD
        if name == "a.json":
            validity = VALID
        cases.append(Case(f, f"solve-o-{i}", validity, solve + [name], files={"dir": DIR}))
    return cases


# plan mutations: (description, function(plan, rng-fraction) -> None, validity)
def _op(plan: dict, frac: float) -> dict:
    ops = plan["nano_ops"]
    return ops[int(frac * len(ops)) % len(ops)]


def _set(path: str, value, validity: str):
    def apply(plan, frac):
        keys = path.split(".")
        target = _op(plan, frac) if keys[0] == "op" else plan
        for k in keys[1 if keys[0] == "op" else 0:-1]:
            target = target[k]
        target[keys[-1]] = value
    return (f"{path}={_short(value)}", apply, validity)


def _short(value) -> str:
    if isinstance(value, Raw):
        value = value.text
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _plan_mutations() -> list[tuple]:
    m = []
    for path in ("model.hidden_size", "model.num_heads", "model.num_kv_heads", "model.head_dim",
                 "model.intermediate_size", "model.vocab_size", "workload.num_decode", "workload.decode_context",
                 "workload.tp_degree", "gpu.num_sms", "gpu.sm_granularity", "num_layers", "op.layer", "op.index",
                 "op.order", "op.sm_count"):
        for v in BAD_INTS:
            validity = BAD
            if path in ("op.order",) and v == 2 ** 70:
                validity = BAD
            m.append(_set(path, v, validity))
    for v in (0, -1, 1.5, True, float("nan"), Raw(HUGE_DIGITS), "32", None):
        m.append(_set("model.num_layers", v, BAD))
    m.append(_set("model.num_layers", 10 ** 9, ANY))
    m.append(_set("model.num_layers", 80, ANY))
    m.append(_set("num_layers", 10 ** 9, BAD))
    m.append(_set("num_layers", 10 ** 6, BAD))
    m.append(_set("num_layers", 3, BAD))
    m.append(_set("gpu.num_sms", 10 ** 9, BAD))
    m.append(_set("op.sm_count", 10 ** 9, BAD))
    m.append(_set("op.sm_count", 133, BAD))
    m.append(_set("op.sm_count", 7, ANY))
    for v in (float("nan"), float("inf"), -1.0, Raw("1e400"), "0", None, True, 1e308):
        m.append(_set("op.start_ms", v, BAD))
        m.append(_set("op.end_ms", v, BAD))
    m.append(_set("op.start_ms", 0.0, ANY))
    m.append(_set("op.end_ms", 1e6, ANY))
    for v in ("nonexistent", "", 123, None, SURROGATE, "x" * 10_000):
        m.append(_set("op.impl", v, BAD))
    for v in ("compute", "memory", "network", "other", "gpu", "", None):
        m.append(_set("op.op_class", v, ANY if v in ("compute", "memory", "network", "other") else BAD))
    for v in ("nope", "", "decode_attn", SURROGATE, 5):
        m.append(_set("op.op", v, BAD if v != "decode_attn" else ANY))
    for v in ([0, 0], [5, 1], [0], [0, 1, 2], [-1, 3], [0, 2 ** 70], "0-64", None, [0.5, 64]):
        m.append(_set("op.tokens", v, BAD))
    for v in (["L0.nope#0"], ["L0.norm1#0", "L0.norm1#0"], "L0.norm1#0", [None], [5]):
        m.append(_set("op.deps", v, BAD))
    for v in ("L0.norm1#0", "L99.kqv#0", "bad id", "", SURROGATE):
        m.append(_set("op.id", v, BAD))
    for v in ("", None, 7):
        m.append(_set("op.stream", v, BAD))
    m.append(_set("op.stream", "brand-new-stream", ANY))
    m.append(_set("op.stream", "Łódź 模型", ANY))
    m.append(_set("op.stream", SURROGATE, BAD))
    for v in (SURROGATE, "", 123, None, "x" * 100_000, f"a{SURROGATE}b"):
        m.append(_set("model.name", v, ANY if v == "x" * 100_000 else BAD))
        m.append(_set("workload.name", v, ANY if v in ("", "x" * 100_000) else BAD))
        m.append(_set("gpu.name", v, ANY if v == "x" * 100_000 else BAD))
    m.append(_set("model.name", "Łódź 模型 🚀", VALID))
    m.append(_set("workload.name", "Łódź 模型 🚀", VALID))
    for v in ("512", [512.5], [True], [0], [-1], 512, None, [Raw(HUGE_DIGITS)]):
        m.append(_set("workload.prefill_lengths", v, BAD))
    for v in ("fp8", "", None, 16):
        m.append(_set("workload.dtype", v, BAD))
    for v in (float("nan"), float("inf"), -1.0, "fast", None):
        for k in ("makespan_ms", "layer_time_ms", "sequential_layer_time_ms", "bound_ms"):
            m.append(_set(f"predicted.{k}", v, BAD))
    m.append(_set("predicted.layer_time_ms", 0.0, ANY))
    for v in (float("nan"), float("inf"), -1.0):
        m.append(_set("solver.time_limit_s", v, BAD))
        m.append(_set("solver.gap", v, BAD))
        m.append(_set("solver.wall_s", v, BAD))
    m.append(_set("solver.seed", 2 ** 70, ANY))
    m.append(_set("solver.note", SURROGATE, ANY))
    m.append(_set("solver.extra_key", "hello", ANY))
    m.append(_set("solver.name", "Łódź", VALID))
    for v in ("zzzz", "", None, "0123456789abcdeF", 5):
        m.append(_set("profile.fingerprint", v, BAD))
    m.append(_set("profile.fingerprint", "0123456789abcdef", BAD))   # another profile's plan: needs --profile
    m.append(_set("profile.source", "guessed", BAD))
    m.append(_set("schema_version", 3, BAD))
    m.append(_set("schema_version", "1", BAD))
    # version 2's 'after' (a nano-op's cross-stream order): unknown ids, wrong types; [] is valid in v2 only
    for v in (["L0.nope#0"], "L0.norm1#0", [7], None):
        m.append(_set("op.after", v, BAD))
    m.append(_set("op.after", [], ANY))
    m.append(_set("unknown_top_key", 1, BAD))
    m.append(_set("model.unknown", 1, BAD))
    m.append(_set("op.unknown", 1, BAD))

    def delete(path: str, validity: str):
        def apply(plan, frac):
            keys = path.split(".")
            target = _op(plan, frac) if keys[0] == "op" else plan
            for k in keys[1 if keys[0] == "op" else 0:-1]:
                target = target[k]
            target.pop(keys[-1], None)
        return (f"del {path}", apply, validity)

    for path in ("model", "workload", "gpu", "profile", "num_layers", "nano_ops", "predicted", "solver",
                 "streams", "nano_batches", "model.hidden_size", "workload.prefill_lengths", "gpu.num_sms",
                 "op.deps", "op.start_ms", "op.impl", "predicted.bound_ms", "solver.name", "profile.fingerprint"):
        m.append(delete(path, BAD))
    for path in ("solver.status", "solver.note", "solver.gap", "profile.interference", "workload.model"):
        m.append(delete(path, ANY))

    def drop_op(plan, frac):
        plan["nano_ops"].remove(_op(plan, frac))

    def dup_op(plan, frac):
        plan["nano_ops"].append(dict(_op(plan, frac)))

    def shuffle_ops(plan, frac):
        random.Random(int(frac * 1e6)).shuffle(plan["nano_ops"])

    def swap_orders(plan, frac):
        a, b = _op(plan, frac), _op(plan, 1 - frac)
        a["order"], b["order"] = b["order"], a["order"]

    def empty_ops(plan, frac):
        plan["nano_ops"] = []

    def all_ops_full_gpu(plan, frac):
        for op in plan["nano_ops"]:
            op["sm_count"] = plan["gpu"]["num_sms"]

    def zero_times(plan, frac):
        for op in plan["nano_ops"]:
            op["start_ms"] = op["end_ms"] = 0.0

    def reverse_times(plan, frac):
        for op in plan["nano_ops"]:
            op["start_ms"], op["end_ms"] = op["end_ms"], op["start_ms"]

    def reindent(plan, frac):
        pass                          # dump_json writes a different layout than plan.write: still valid

    m += [("drop a nano-op", drop_op, BAD), ("duplicate a nano-op", dup_op, BAD),
          ("shuffle nano_ops", shuffle_ops, ANY), ("swap two orders", swap_orders, ANY),
          ("no nano_ops", empty_ops, BAD), ("every op on the full GPU", all_ops_full_gpu, ANY),
          ("all times zero", zero_times, ANY), ("start/end swapped", reverse_times, BAD),
          ("unchanged", reindent, VALID)]
    return m


PLAN_MUTATIONS = _plan_mutations()
PLAN_BASES = ("solved-W1", "W2", "W3", "W4", "tiny-split2", "tiny-sequential")


def _combine(validities: list[str]) -> str:
    if BAD in validities:
        return BAD
    if ANY in validities:
        return ANY
    return VALID


def fam_plans(rng: random.Random, n: int) -> list[Case]:
    """Mutated plan JSON through simulate (mostly), compare and run."""
    f = "plan"
    cases = [Case(f, f"unchanged-{b}", ANY if b.startswith("tiny") else VALID, ["simulate", "plan.json", "-o", "sim"],
                  files={"plan.json": Maker(lambda base, b=b: dump_json(base.plan(b)))}) for b in PLAN_BASES]
    for i in range(n):
        plan_name = _pick(rng, PLAN_BASES)
        picks = [_pick(rng, PLAN_MUTATIONS) for _ in range(1 if rng.random() < 0.8 else rng.randint(2, 3))]
        fracs = [rng.random() for _ in picks]
        validity = _combine([p[2] for p in picks])
        if plan_name.startswith("tiny") and validity == VALID:
            validity = ANY              # made with a fake profile no file holds: refusing it is fine

        def make(base, plan_name=plan_name, picks=picks, fracs=fracs):
            plan = base.plan(plan_name)
            for (_, apply, _), frac in zip(picks, fracs):
                try:
                    apply(plan, frac)
                except (KeyError, TypeError, IndexError, ValueError, AttributeError):
                    pass                # an earlier mutation removed what this one edits
            return dump_json(plan)

        verb = rng.random()
        what = "; ".join(p[0] for p in picks)
        files = {"plan.json": Maker(make)}
        if verb < 0.85:
            case = Case(f, f"simulate {plan_name}: {what}", validity, ["simulate", "plan.json", "-o", "sim"],
                        files=files)
        elif verb < 0.93:
            files["m.json"] = Maker(lambda base, p=plan_name: dump_json(measured_from_plan(base.plan(p))))
            case = Case(f, f"compare {plan_name}: {what}", validity, ["compare", "plan.json", "m.json"], files=files)
        else:
            case = Case(f, f"run {plan_name}: {what}", validity, ["run", "--schedule", "plan.json"], files=files,
                        needs_gpu=True)
        cases.append(case)
    return cases


def fam_plan_raw(rng: random.Random, n: int) -> list[Case]:
    """Plan files that are not JSON objects: deep nesting, huge numbers, garbage, wrong encodings."""
    f = "plan-raw"

    def solved_text(base):
        return dump_json(base.plan("solved-W1"))

    raw = {
        "deep-nesting-100k": nested_json(100_000),
        "deep-nesting-1k": nested_json(1_000),
        "huge-int": b'{"schema_version": ' + HUGE_DIGITS.encode() + b"}",
        "empty": b"",
        "whitespace": b"  \n",
        "null": b"null",
        "list": b"[]",
        "string": b'"plan"',
        "number-nan": b"NaN",
        "truncated": Maker(lambda b: solved_text(b)[: len(solved_text(b)) // 2]),
        "utf8-bom": Maker(lambda b: b"\xef\xbb\xbf" + solved_text(b)),
        "utf16": Maker(lambda b: solved_text(b).decode().encode("utf-16")),
        "latin1-garbage": bytes(range(256)),
        "nul-bytes": b"\x00" * 64,
        "surrogate-pass-utf8": Maker(lambda b: solved_text(b).replace(b'"name": "', b'"name": "\xed\xb2\x80', 1)),
        "duplicate-keys": Maker(lambda b: solved_text(b).replace(b'{\n "schema_version": ',
                                                               b'{\n "schema_version": 3,\n "schema_version": ', 1)),
        "yaml-not-json": b"schema_version: 1\n",
        "gz": b"\x1f\x8b\x08\x00" + b"\x00" * 20,
    }
    cases = []
    for name, content in raw.items():
        validity = BAD
        cases.append(Case(f, f"simulate-{name}", validity, ["simulate", "plan.json", "-o", "sim"],
                          files={"plan.json": content}))
    cases.append(Case(f, "run-deep-nesting", BAD, ["run", "--schedule", "plan.json"],
                      files={"plan.json": nested_json(100_000)}))
    cases.append(Case(f, "compare-deep-nesting", BAD, ["compare", "plan.json", "m.json"],
                      files={"plan.json": Maker(solved_text), "m.json": nested_json(100_000)}))
    for i in range(n):
        depth = rng.choice([500, 990, 1000, 5000, 50_000])
        cases.append(Case(f, f"simulate-nest-{depth}-{i}", BAD, ["simulate", "plan.json"],
                          files={"plan.json": nested_json(depth)}))
    return cases


def measured_from_plan(plan: dict) -> dict:
    """A measured.json (run --timeline format) made of the plan's own stated times."""
    spans = [{"id": o["id"], "op": o["op"], "layer": o["layer"], "op_class": o["op_class"], "stream": o["stream"],
              "sm_count": o["sm_count"], "num_tokens": o["tokens"][1] - o["tokens"][0],
              "start_ms": o["start_ms"], "end_ms": o["end_ms"]} for o in plan["nano_ops"]]
    return {"label": "measured (fuzz copy of the plan's times)", "num_layers": plan["num_layers"], "spans": spans}


def fam_compare(rng: random.Random, n: int) -> list[Case]:
    f = "compare"
    plan = {"plan.json": Maker(lambda b: dump_json(b.plan("solved-W1")))}

    def measured(mutate):
        def make(base):
            data = measured_from_plan(base.plan("solved-W1"))
            mutate(data)
            return dump_json(data)
        return Maker(make)

    def span_set(key, value):
        def mutate(d):
            d["spans"][0][key] = value
        return mutate

    cases = [Case(f, "ok", VALID, ["compare", "plan.json", "m.json"], files={**plan, "m.json": measured(lambda d: 0)}),
             Case(f, "ok-o", VALID, ["compare", "plan.json", "m.json", "-o", "c.json"],
                  files={**plan, "m.json": measured(lambda d: 0)})]
    mutations = [
        ("no spans", lambda d: d.update(spans=[]), BAD),
        ("spans null", lambda d: d.update(spans=None), BAD),
        ("no label", lambda d: d.pop("label"), BAD),
        ("num_layers 0", lambda d: d.update(num_layers=0), BAD),
        ("num_layers str", lambda d: d.update(num_layers="two"), BAD),
        ("num_layers huge", lambda d: d.update(num_layers=Raw(HUGE_DIGITS)), BAD),
        ("num_layers nan", lambda d: d.update(num_layers=float("nan")), BAD),
        ("top list", lambda d: d.clear(), BAD),
        ("span extra key", span_set("extra", 1), BAD),
        ("span start nan", span_set("start_ms", float("nan")), BAD),
        ("span end inf", span_set("end_ms", float("inf")), BAD),
        ("span start str", span_set("start_ms", "0"), BAD),
        ("span id unknown", span_set("id", "L9.zzz#0"), BAD),
        ("span id surrogate", span_set("id", SURROGATE), BAD),
        ("span sm_count -1", span_set("sm_count", -1), BAD),
        ("span end before start", span_set("end_ms", -5.0), BAD),
        ("span not object", lambda d: d["spans"].__setitem__(0, 5), BAD),
        ("all spans zero", lambda d: [s.update(start_ms=0.0, end_ms=0.0) for s in d["spans"]], BAD),
        ("wrapped in timeline", lambda d: d.update(timeline=dict(d)), ANY),
    ]
    for name, mutate, validity in mutations:
        cases.append(Case(f, name, validity, ["compare", "plan.json", "m.json"], files={**plan, "m.json": measured(mutate)}))
    for i in range(n):
        v = _pick(rng, ["-1", "0", str(2 ** 70), "nan", "3"])
        cases.append(Case(f, f"worst-{v}-{i}", ANY if v in ("0", "3") else BAD,
                          ["compare", "plan.json", "m.json", "--worst", v], files={**plan, "m.json": measured(lambda d: 0)}))
    cases.append(Case(f, "measured-deep", BAD, ["compare", "plan.json", "m.json"],
                      files={**plan, "m.json": nested_json(100_000)}))
    return cases


# ---- model specs ----------------------------------------------------------------------------------

LLAMA_YAML = {"name": "llama-3-8b-copy", "hidden_size": 4096, "num_heads": 32, "num_kv_heads": 8, "head_dim": 128,
              "intermediate_size": 14336, "num_layers": 32, "vocab_size": 128256}
QWEN_LIKE = {"name": "qwen2-7b-like", "hidden_size": 3584, "num_heads": 28, "num_kv_heads": 4, "head_dim": 128,
             "intermediate_size": 18944, "num_layers": 28, "vocab_size": 152064, "has_qkv_bias": True}
INT_FIELDS = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "num_layers",
              "vocab_size")


def fam_model_yaml(rng: random.Random, n: int) -> list[Case]:
    f = "model-yaml"
    wl = ["--workload", "W2"]
    cases = [
        Case(f, "llama-copy", VALID, _analyze("--model", "m.yaml", *wl), files={"m.yaml": dump_yaml(LLAMA_YAML)}),
        Case(f, "qwen-like", VALID, _analyze("--model", "m.yaml", *wl), files={"m.yaml": dump_yaml(QWEN_LIKE)}),
        Case(f, "tiny-fixture", VALID, _analyze("--model", "m.yaml", "--decode", "64", "--context", "512"),
             files={"m.yaml": (FIXTURES / "tiny-model.yaml").read_bytes()}),
        Case(f, "yml-suffix", VALID, _analyze("--model", "m.yml", *wl), files={"m.yml": dump_yaml(LLAMA_YAML)}),
        Case(f, "solve-qwen-like", VALID, ["solve", "--model", "m.yaml", *SMALL_WL, *SOLVE_FAST, "-o", "p.json"],
             files={"m.yaml": dump_yaml(QWEN_LIKE)}, timeout_s=40),
        Case(f, "profile-qwen-like", VALID, ["profile", "--analytic", "--model", "m.yaml", *SMALL_WL, "-o", "q.csv"],
             files={"m.yaml": dump_yaml(QWEN_LIKE)}, check=_only_files("q.csv")),
        Case(f, "heads-0", BAD, _analyze("--model", "m.yaml", *wl), files={"m.yaml": dump_yaml({**LLAMA_YAML, "num_heads": 0})}),
        Case(f, "hidden-1e400", BAD, _analyze("--model", "m.yaml", *wl),
             files={"m.yaml": dump_yaml({**LLAMA_YAML, "hidden_size": Raw("1.0e+400")})}),
        Case(f, "hidden-1.5", BAD, _analyze("--model", "m.yaml", *wl), files={"m.yaml": dump_yaml({**LLAMA_YAML, "hidden_size": 1.5})}),
        Case(f, "hidden-true", BAD, _analyze("--model", "m.yaml", *wl), files={"m.yaml": dump_yaml({**LLAMA_YAML, "hidden_size": True})}),
        Case(f, "hidden-5000-digits", BAD, _analyze("--model", "m.yaml", *wl),
             files={"m.yaml": dump_yaml({**LLAMA_YAML, "hidden_size": Raw(HUGE_DIGITS)})}),
        Case(f, "name-surrogate-analyze", BAD, _analyze("--model", "m.yaml", *wl),
             files={"m.yaml": dump_yaml({**LLAMA_YAML, "name": f"x{SURROGATE}"})}),
        Case(f, "name-surrogate-solve", BAD, ["solve", "--model", "m.yaml", *SMALL_WL, *SOLVE_FAST, "-o", "p.json"],
             files={"m.yaml": dump_yaml({**LLAMA_YAML, "name": f"x{SURROGATE}"})}, timeout_s=40),
        Case(f, "deep-nesting", BAD, _analyze("--model", "m.yaml", *wl), files={"m.yaml": nested_yaml(100_000)}),
        Case(f, "billion-laughs", BAD, _analyze("--model", "m.yaml", *wl), files={"m.yaml": _laughs()}),
        Case(f, "empty", BAD, _analyze("--model", "m.yaml", *wl), files={"m.yaml": b""}),
        Case(f, "list", BAD, _analyze("--model", "m.yaml", *wl), files={"m.yaml": b"- 1\n- 2\n"}),
        Case(f, "tab-indent", BAD, _analyze("--model", "m.yaml", *wl), files={"m.yaml": b"name: x\n\thidden_size: 1\n"}),
        Case(f, "non-utf8", BAD, _analyze("--model", "m.yaml", *wl), files={"m.yaml": b"name: \xff\xfe\n"}),
        Case(f, "heads-not-div-tp", BAD, _analyze("--model", "m.yaml", "--decode", "64", "--tp", "3"),
             files={"m.yaml": dump_yaml(LLAMA_YAML)}),
        Case(f, "kv-heads-lt-tp", ANY, _analyze("--model", "m.yaml", "--decode", "64", "--tp", "16"),
             files={"m.yaml": dump_yaml(LLAMA_YAML)}),
    ]
    for i in range(n):
        data = dict(LLAMA_YAML if rng.random() < 0.7 else QWEN_LIKE)
        r = rng.random()
        if r < 0.55:
            key = _pick(rng, INT_FIELDS)
            value = _pick(rng, BAD_INTS)
            data[key] = value
            what, validity = f"{key}={_short(value)}", BAD
        elif r < 0.65:
            key = _pick(rng, ["num_experts", "num_experts_per_token"])
            value = _pick(rng, [-1, 9, 1.5, "x", 2 ** 70, 0])
            data[key] = value
            validity = ANY if (key, value) in (("num_experts", 9), ("num_experts_per_token", 0), ("num_experts", 0)) else BAD
            if key == "num_experts_per_token" and value == 9:
                validity = BAD
            what = f"{key}={_short(value)}"
        elif r < 0.72:
            value = _pick(rng, ["yes", 1, None, "true", 2])
            data["has_qkv_bias"] = value
            what, validity = f"has_qkv_bias={value!r}", ANY if value in (1,) else BAD
        elif r < 0.8:
            value = _pick(rng, WEIRD_STRINGS + [123, None, ["a"]])
            data["name"] = value
            validity = ANY if value in ("Łódź 模型 🚀", "-", "--help", "../../etc/passwd", "x" * 100_000, " ", 123) else BAD
            what = f"name={_short(value)}"
        elif r < 0.86:
            key = _pick(rng, list(data))
            data.pop(key)
            what, validity = f"del {key}", ANY if key == "has_qkv_bias" else BAD
        elif r < 0.9:
            data[_pick(rng, ["hidden", "n_heads", "", "模型"])] = 1
            what, validity = "unknown key", BAD
        else:
            data["num_kv_heads"] = _pick(rng, [3, 5, 7, 64])
            what, validity = f"num_kv_heads={data['num_kv_heads']}", BAD
        verb = rng.random()
        files = {"m.yaml": dump_yaml(data)}
        if verb < 0.8:
            args = _analyze("--model", "m.yaml", *wl)
        elif verb < 0.92:
            args = ["profile", "--analytic", "--model", "m.yaml", *SMALL_WL, "-o", "p.csv"]
        else:
            args = ["solve", "--model", "m.yaml", *SMALL_WL, *SOLVE_FAST, "-o", "p.json"]
        cases.append(Case(f, f"{args[0]}: {what}", validity, args, files=files, timeout_s=40))
    return cases


def _laughs() -> bytes:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("name: *a8")
    return ("\n".join(lines) + "\n").encode()


def _only_files(*names: str):
    def check(stdout: str, new_files: list[str], case_dir: str):
        extra = sorted(set(new_files) - set(names))
        missing = sorted(set(names) - set(new_files))
        if extra or missing:
            return f"new files {new_files}, expected exactly {list(names)}"
        return None
    return check


def _named(expected: str, not_named: bool = False):
    def check(stdout: str, new_files: list[str], case_dir: str):
        line = next((ln for ln in stdout.splitlines() if ln.startswith("model ")), "")
        if case_dir in line:
            return f"model named after the case folder: {line.strip()!r}"
        if expected and expected not in line:
            return f"model line {line.strip()!r} lacks {expected!r}"
        return None
    return check


def fam_model_hf(rng: random.Random, n: int) -> list[Case]:
    f = "model-hf"
    wl = ["--workload", "W2"]

    def cfg(name="Meta-Llama-3-8B", **changes):
        def make(base):
            data = dict(base.hf[name])
            for k, v in changes.items():
                if v is _DELETE:
                    data.pop(k, None)
                else:
                    data[k] = v
            return dump_json(data)
        return Maker(make)

    def hf_case(case_name, validity, changes=None, args=None, path="cfg/config.json", name="Meta-Llama-3-8B",
                check=None, extra_files=None):
        files = {path: cfg(name, **(changes or {})), **(extra_files or {})}
        return Case(f, case_name, validity, args or _analyze("--model", path, *wl), files=files, check=check)

    cases = [
        hf_case("llama-ok", VALID),
        hf_case("mixtral-ok", VALID, name="Mixtral-8x7B-v0.1"),
        hf_case("named-after-folder", VALID, path="Meta-Llama-3-8B/config.json", check=_named("Meta-Llama-3-8B")),
        hf_case("flat-foo.config.json", VALID, path="foo.config.json", check=_named("foo")),
        hf_case("flat-config.json", ANY, path="config.json", check=_named("")),
        hf_case("heads-0", BAD, {"num_attention_heads": 0}),
        hf_case("kv-heads-0", BAD, {"num_key_value_heads": 0}),
        hf_case("hidden-4096.7", BAD, {"hidden_size": 4096.7}),
        hf_case("hidden-true", BAD, {"hidden_size": True}),
        hf_case("hidden-1e400", BAD, {"hidden_size": Raw("1e400")}),
        hf_case("hidden-5000-digits", BAD, {"hidden_size": Raw(HUGE_DIGITS)}),
        hf_case("hidden-nan", BAD, {"hidden_size": float("nan")}),
        hf_case("heads-3", BAD, {"num_key_value_heads": 3}),
        hf_case("model-type-gpt2", BAD, {"model_type": "gpt2"}),
        hf_case("no-hidden", BAD, {"hidden_size": _DELETE}),
        hf_case("name-surrogate", BAD, {"_name_or_path": f"org/{SURROGATE}"}),
        hf_case("name-surrogate-solve", BAD, {"_name_or_path": f"org/{SURROGATE}"},
                args=["solve", "--model", "cfg/config.json", *SMALL_WL, *SOLVE_FAST, "-o", "p.json"]),
        hf_case("experts-per-tok-9", BAD, {"num_experts_per_tok": 9}, name="Mixtral-8x7B-v0.1"),
        hf_case("unknown-keys-ok", VALID, {"rope_scaling": {"type": "yarn"}, "some_new_field": [1, 2]}),
        hf_case("head-dim-null", VALID, {"head_dim": None}),
        hf_case("deep-nesting", BAD, extra_files={"cfg/config.json": nested_json(100_000)}),
        hf_case("solve-ok", VALID, args=["solve", "--model", "cfg/config.json", *SMALL_WL, *SOLVE_FAST, "-o", "p.json"]),
        hf_case("mistral-ok", VALID, name="Mistral-7B-v0.1"),
        hf_case("mistral-context-beyond-window", ANY, name="Mistral-7B-v0.1",
                args=_analyze("--model", "cfg/config.json", "--decode", "64", "--context", "8192")),
        hf_case("mistral-solve-beyond-window", ANY, name="Mistral-7B-v0.1",
                args=["solve", "--model", "cfg/config.json", "--decode", "64", "--context", "8192", *SOLVE_FAST,
                      "-o", "p.json"]),
        hf_case("mistral-window-null", VALID, {"sliding_window": None}, name="Mistral-7B-v0.1"),
    ]
    for value in (-1, "x", 1.5, 2 ** 70, True, Raw(HUGE_DIGITS), 0):
        cases.append(hf_case(f"mistral-window={_short(value)}", ANY if value == 0 else BAD, {"sliding_window": value},
                             name="Mistral-7B-v0.1"))
    for i in range(n):
        key = _pick(rng, ["hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                          "num_hidden_layers", "vocab_size", "head_dim", "model_type", "num_local_experts",
                          "num_experts_per_tok", "_name_or_path", "attention_bias"])
        if key == "model_type":
            value = _pick(rng, ["", "LLAMA", "llama ", None, 5, "qwen2", "mistral", "mixtral", SURROGATE])
            validity = ANY if value in ("qwen2", "mistral") else BAD
            if value == "mixtral":
                validity = ANY
        elif key == "_name_or_path":
            value = _pick(rng, WEIRD_STRINGS + [5, None])
            validity = BAD if value in (SURROGATE, "\x00", "NUL\x00byte", 5) else ANY
        elif key == "attention_bias":
            value = _pick(rng, [True, "false", 1, None])
            validity = VALID if value is True else ANY
            if value == "false":
                validity = BAD
        elif key in ("num_local_experts", "num_experts_per_tok"):
            value = _pick(rng, [-1, 1.5, "8", 2 ** 70, None, True])
            validity = BAD if value not in (None,) else ANY
        elif key == "head_dim":
            value = _pick(rng, [-1, 1.5, 2 ** 70, "128", True, 0, None])
            validity = ANY if value in (0, None, "128") else BAD
        else:
            value = _pick(rng, BAD_INTS + [4096.0, _DELETE])
            validity = ANY if value in ("4096", 4096.0) else BAD
            if value is _DELETE and key == "num_key_value_heads":
                validity = VALID            # HF default: as many KV heads as heads
            if value is False and key == "num_key_value_heads":
                validity = BAD
        cases.append(hf_case(f"{key}={_short(value)}-{i}", validity, {key: value}))
    return cases


class _Delete:
    def __repr__(self):
        return "<deleted>"


_DELETE = _Delete()


# ---- workloads --------------------------------------------------------------------------------------

SMALL_WORKLOAD = {"name": "fuzz small", "model": "llama-3-8b", "num_decode": 64, "decode_context": 1024,
                  "prefill_lengths": [256]}


def fam_workload_yaml(rng: random.Random, n: int) -> list[Case]:
    f = "workload-yaml"

    def wl_case(name, validity, changes=None, verb="analyze", raw: bytes | None = None):
        data = {**SMALL_WORKLOAD}
        for k, v in (changes or {}).items():
            if v is _DELETE:
                data.pop(k, None)
            else:
                data[k] = v
        files = {"w.yaml": raw if raw is not None else dump_yaml(data)}
        if verb == "analyze":
            args = _analyze("--workload", "w.yaml")
        elif verb == "solve":
            args = ["solve", "--workload", "w.yaml", *SOLVE_FAST, "-o", "p.json"]
        else:
            args = ["profile", "--analytic", "--workload", "w.yaml", "-o", "p.csv"]
        return Case(f, f"{verb}: {name}", validity, args, files=files, timeout_s=40)

    cases = [
        wl_case("ok", VALID),
        wl_case("ok-solve", VALID, verb="solve"),
        wl_case("ok-profile", VALID, verb="profile"),
        wl_case("fixture", VALID, {"model": "llama-3-8b"}, raw=(FIXTURES / "tiny-workload.yaml").read_bytes()
                + b"model: llama-3-8b\n"),
        wl_case("model-123", BAD, {"model": 123}),
        wl_case("model-unknown", BAD, {"model": "gpt-5"}),
        wl_case("model-list", BAD, {"model": ["llama-3-8b"]}),
        wl_case("prefill-str-512", BAD, {"prefill_lengths": "512"}),
        wl_case("prefill-str-512-solve", BAD, {"prefill_lengths": "512"}, verb="solve"),
        wl_case("prefill-int", BAD, {"prefill_lengths": 512}),
        wl_case("prefill-float", BAD, {"prefill_lengths": [512.5]}),
        wl_case("prefill-bool", BAD, {"prefill_lengths": [True]}),
        wl_case("prefill-null", ANY, {"prefill_lengths": None}),
        wl_case("tp-3-heads", BAD, {"tp_degree": 3}),
        wl_case("dtype-fp8", BAD, {"dtype": "fp8"}),
        wl_case("no-tokens", BAD, {"num_decode": 0, "prefill_lengths": []}),
        wl_case("name-surrogate", BAD, {"name": f"w{SURROGATE}"}),
        wl_case("name-surrogate-solve", BAD, {"name": f"w{SURROGATE}"}, verb="solve"),
        wl_case("deep", BAD, raw=nested_yaml(100_000)),
        wl_case("unknown-key", BAD, {"num_prompts": 3}),
        wl_case("decode-2**70", BAD, {"num_decode": 2 ** 70}),
        wl_case("decode-2**70-solve", BAD, {"num_decode": 2 ** 70}, verb="solve"),
        wl_case("decode-huge-digits", BAD, {"num_decode": Raw(HUGE_DIGITS)}),
    ]
    for i in range(n):
        key = _pick(rng, ["num_decode", "decode_context", "prefill_lengths", "tp_degree", "dtype", "name", "model"])
        if key in ("num_decode", "decode_context", "tp_degree"):
            value = _pick(rng, BAD_INTS + [_DELETE])
            validity = BAD
            if key == "num_decode" and value in (0,):
                validity = ANY
            if value is _DELETE and key == "tp_degree":
                validity = VALID
        elif key == "prefill_lengths":
            value = _pick(rng, ["512", 512, [512.5], [True], [0], [-1], [Raw(HUGE_DIGITS)], [2 ** 70], [None],
                                ["256"], [[256]], {"a": 1}, [256, 256], [], _DELETE])
            validity = VALID if value in ([256, 256], [], _DELETE) else BAD
        elif key == "dtype":
            value = _pick(rng, ["fp8", "BF16", "", None, 16, "int8", "fp16", "fp32", SURROGATE])
            validity = VALID if value in ("fp16", "fp32") else (ANY if value == "BF16" else BAD)
        elif key == "name":
            value = _pick(rng, WEIRD_STRINGS + [123, None, _DELETE])
            validity = BAD if value in (SURROGATE, "\x00", "NUL\x00byte") else ANY
        else:
            value = _pick(rng, [123, None, "", "llama-3-70b", "mixtral-8x7b", SURROGATE, "gpt-5", "model.yaml"])
            validity = VALID if value in ("llama-3-70b", "mixtral-8x7b") else BAD
        verb = "analyze" if rng.random() < 0.8 else ("solve" if rng.random() < 0.5 else "profile")
        if verb == "solve" and validity == VALID and value in ("llama-3-70b", "mixtral-8x7b"):
            verb = "analyze"              # no bundled measured table for them: an analytic solve is slow
        cases.append(wl_case(f"{key}={_short(value)}-{i}", validity, {key: value}, verb=verb))
    return cases


# ---- profile tables -------------------------------------------------------------------------------

def _profile_maker(fmt: str, mutate: Callable | None):
    """A profile table file from the bundled H100 one, mutated; made with pandas in the case's process."""
    def make(base):
        import pandas as pd
        import pyarrow.parquet as pq
        table = pq.read_table(BUNDLED_PROFILE)
        meta = json.loads(table.schema.metadata[b"nfsearch-profile"])
        rows = table.to_pandas()
        if mutate is not None:
            out = mutate(rows, meta)
            if out is not None:
                rows, meta = out
        if fmt == "csv":
            head = "# nfsearch-profile " + (meta if isinstance(meta, str) else json.dumps(meta, sort_keys=True))
            body = rows.to_csv(index=False, float_format="%.6g") if isinstance(rows, pd.DataFrame) else rows
            return (head + "\n" + body).encode("utf-8", "surrogatepass")
        import pyarrow as pa
        for col in rows.columns:
            if rows[col].dtype == object and rows[col].map(type).nunique() > 1:
                rows[col] = rows[col].astype(str)      # parquet columns have one type: "abc" beside numbers
        out = pa.Table.from_pandas(rows, preserve_index=False)
        raw = meta.encode("utf-8", "surrogatepass") if isinstance(meta, str) else json.dumps(meta).encode()
        out = out.replace_schema_metadata({**(out.schema.metadata or {}), b"nfsearch-profile": raw})
        sink = io.BytesIO()
        pq.write_table(out, sink)
        return sink.getvalue()
    return Maker(make)


def _meta_set(key, value):
    def mutate(rows, meta):
        if value is _DELETE:
            meta.pop(key, None)
        else:
            meta[key] = value
        return rows, json.dumps(meta, sort_keys=True, default=lambda x: x.text if isinstance(x, Raw) else str(x)) \
            .replace(f'"{key}": "{HUGE_DIGITS}"', f'"{key}": {HUGE_DIGITS}')
    return mutate


def _rows_set(col, value, which="one", op=None):
    def mutate(rows, meta):
        import numpy as np
        target = rows.index if op is None else rows.index[rows["op"] == op]
        if which == "one":
            target = target[len(target) // 3: len(target) // 3 + 1]
        if isinstance(value, str):
            rows[col] = rows[col].astype(object)      # arrow-backed strings cannot hold odd values
        elif isinstance(value, float) and col != "time_ms":
            rows[col] = rows[col].astype("float64")
        rows.loc[target, col] = value if not isinstance(value, float) else np.float64(value)
        return rows, meta
    return mutate


def _dup_rows(same: bool):
    def mutate(rows, meta):
        import pandas as pd
        extra = rows[(rows["op"] == "kqv") & (rows["co_class"] == "")].head(5).copy()
        if not same:
            extra["time_ms"] = extra["time_ms"] * 3.0
        return pd.concat([rows, extra], ignore_index=True), meta
    return mutate


def _drop(col):
    def mutate(rows, meta):
        return rows.drop(columns=[col]), meta
    return mutate


def _only_op_missing(op):
    def mutate(rows, meta):
        return rows[rows["op"] != op], meta
    return mutate


def _empty_rows(rows, meta):
    return rows.head(0), meta


def _extra_col(rows, meta):
    rows["notes"] = "x"
    return rows, meta


PROFILE_MUTATIONS = (
    [(f"meta num_sms={_short(v)}", _meta_set("num_sms", v), BAD)
     for v in ("abc", 0, -1, 1e300, 10 ** 9, float("inf"), 1.5, True, None, Raw(HUGE_DIGITS), "132")]
    + [(f"meta sm_granularity={_short(v)}", _meta_set("sm_granularity", v), BAD) for v in (0, -8, "x", 1000, 2.5)]
    + [(f"meta source={_short(v)}", _meta_set("source", v), BAD) for v in ("xyz", 123, None)]
    + [(f"meta gpu_name={_short(v)}", _meta_set("gpu_name", v), BAD) for v in ("", 123, SURROGATE, None)]
    + [(f"meta {k}={_short(v)}", _meta_set(k, v), BAD)
       for k in ("peak_tflops", "mem_bandwidth_tbps") for v in ("fast", -1, 0, float("nan"), float("inf"))]
    + [(f"meta gpu_key={_short(v)}", _meta_set("gpu_key", v), BAD) for v in ("zzz", 123)]
    + [(f"meta del {k}", _meta_set(k, _DELETE), BAD) for k in ("gpu_name", "num_sms", "sm_granularity", "source")]
    + [("meta not json", lambda r, m: (r, "{not json"), BAD), ("meta list", lambda r, m: (r, "[1, 2]"), BAD),
       ("meta deep", lambda r, m: (r, "[" * 100_000 + "]" * 100_000), BAD),
       ("meta huge int", lambda r, m: (r, json.dumps(m).replace('"num_sms": 132', '"num_sms": ' + HUGE_DIGITS)), BAD)]
    + [(f"row time_ms={_short(v)}", _rows_set("time_ms", v), BAD)
       for v in (float("inf"), 1e300, float("nan"), -1.0, 0.0, "abc")]
    + [(f"kqv times={_short(v)}", _rows_set("time_ms", v, which="all", op="kqv"), BAD)
       for v in (float("inf"), 1e300)]
    + [("decode_attn one time inf", _rows_set("time_ms", float("inf"), which="one", op="decode_attn"), BAD),
       ("row time_ms=1e-300", _rows_set("time_ms", 1e-300), ANY)]
    + [(f"row sm_count={_short(v)}", _rows_set("sm_count", v), BAD) for v in (0, -8, 10 ** 9, 2.5, "x")]
    + [(f"row num_tokens={_short(v)}", _rows_set("num_tokens", v), BAD) for v in (-1, 0, 2.5, "x")]
    + [(f"row context={_short(v)}", _rows_set("context", v), BAD) for v in (-1, 2.5)]
    + [(f"row op={_short(v)}", _rows_set("op", v), ANY) for v in ("", "nope", "模型")]
    + [(f"row impl={_short(v)}", _rows_set("impl", v), ANY) for v in ("", "other")]
    + [(f"row co_class={_short(v)}", _rows_set("co_class", v), BAD) for v in ("gpu", SURROGATE)]
    + [("duplicate rows, other times", _dup_rows(False), BAD), ("duplicate rows, same times", _dup_rows(True), ANY),
       ("no kqv rows", _only_op_missing("kqv"), BAD), ("no rows", _empty_rows, BAD),
       ("extra column", _extra_col, ANY)]
    + [(f"drop column {c}", _drop(c), BAD) for c in ("time_ms", "sm_count", "op")]
    + [("unchanged", None, VALID)]
)


def fam_profiles(rng: random.Random, n: int) -> list[Case]:
    """Mutated profile tables through simulate --profile (replay) and solve --profile."""
    f = "profile-table"
    plan = {"plan.json": Maker(lambda b: dump_json(b.plan("solved-W1")))}

    def prof_case(name, validity, fmt, mutate, verb):
        path = f"p.{fmt}"
        files = {path: _profile_maker(fmt, mutate)}
        if verb == "simulate":
            return Case(f, f"simulate {fmt}: {name}", validity, ["simulate", "plan.json", "--profile", path, "-o", "sim"],
                        files={**plan, **files})
        if verb == "solve":
            return Case(f, f"solve {fmt}: {name}", validity, ["solve", "--workload", "W1", "--profile", path, *SOLVE_FAST,
                                                            "-o", "out.json"], files=files, timeout_s=40)
        return Case(f, f"run {fmt}: {name}", validity, ["run", "--schedule", "plan.json", "--profile", path],
                    files={**plan, **files}, needs_gpu=True)

    cases = [prof_case("unchanged", VALID, fmt, None, verb) for fmt in ("csv", "parquet") for verb in ("simulate", "solve")]
    analytic = str(BUNDLED_PROFILE.with_name("llama-3-8b.analytic.parquet"))
    cases += [
        Case(f, "solve bundled analytic", VALID, ["solve", "--workload", "W1", "--profile", analytic, *SOLVE_FAST,
                                                  "-o", "out.json"], timeout_s=40),
        Case(f, "simulate bundled analytic", VALID, ["simulate", "plan.json", "--profile", analytic, "-o", "sim"],
             files=plan),
        Case(f, "simulate another profile without --profile", BAD, ["simulate", "plan.json", "-o", "sim"],
             files={"plan.json": Maker(lambda b: dump_json(_with_fingerprint(b.plan("solved-W1"))))}),
    ]
    cases += [
        prof_case("num_sms abc", BAD, "csv", _meta_set("num_sms", "abc"), "simulate"),
        prof_case("inf time", BAD, "csv", _rows_set("time_ms", float("inf"), which="all", op="kqv"), "simulate"),
        prof_case("inf time", BAD, "parquet", _rows_set("time_ms", float("inf"), which="all", op="decode_attn"), "solve"),
        prof_case("1e300 times", BAD, "csv", _rows_set("time_ms", 1e300, which="all", op="kqv"), "simulate"),
        prof_case("duplicate rows", BAD, "parquet", _dup_rows(False), "simulate"),
        prof_case("duplicate rows", BAD, "csv", _dup_rows(False), "solve"),
    ]
    raw_files = {
        "csv-no-meta": ("csv", b"op,impl,num_tokens,context,sm_count,time_ms\nkqv,x,128,0,8,0.1\n"),
        "csv-empty": ("csv", b""),
        "csv-garbage": ("csv", bytes(range(256))),
        "csv-bom": ("csv", None),
        "parquet-garbage": ("parquet", b"PAR1" + b"\x00" * 100 + b"PAR1"),
        "parquet-empty": ("parquet", b""),
        "parquet-is-csv": ("parquet", None),
    }
    for name, (fmt, content) in raw_files.items():
        if content is None:
            if name == "csv-bom":
                maker = Maker(lambda b: b"\xef\xbb\xbf" + _profile_maker("csv", None).make(b))
            else:
                maker = _profile_maker("csv", None)
            files = {f"p.{fmt}": maker}
        else:
            files = {f"p.{fmt}": content}
        cases.append(Case(f, f"simulate {name}", BAD, ["simulate", "plan.json", "--profile", f"p.{fmt}", "-o", "sim"],
                          files={**plan, **files}))
    for i in range(n):
        name, mutate, validity = _pick(rng, PROFILE_MUTATIONS)
        fmt = "csv" if rng.random() < 0.6 or "udc80" in name else "parquet"   # parquet cannot hold a surrogate
        r = rng.random()
        verb = "simulate" if r < 0.75 else ("solve" if r < 0.9 else "run")
        cases.append(prof_case(f"{name} #{i}", validity, fmt, mutate, verb))
    return cases


def _with_fingerprint(plan: dict, fingerprint: str = "0123456789abcdef") -> dict:
    plan["profile"]["fingerprint"] = fingerprint
    return plan


def fam_interrupt(rng: random.Random, n: int) -> list[Case]:
    """Ctrl-C part way: exit 130 (or finish), and never a half-written output or a temp file."""
    f = "interrupt"
    plan = {"plan.json": Maker(lambda b: dump_json(b.plan("W2")))}
    cases = []
    for i in range(max(n, 4)):
        kind = i % 4
        at = round(rng.uniform(0.05, 0.5 if kind == 2 else 1.5), 2)
        if kind == 0:
            args = ["solve", "--workload", "W2", "--time-limit", "3", "-o", "p.json"]
            files = {}
        elif kind == 1:
            args = ["simulate", "plan.json", "-o", "sim"]
            files = plan
        elif kind == 2:
            args = ["profile", "--analytic", "--workload", "W3", "-o", "a.parquet"]
            files = {}
        else:
            args = ["solve", "--workload", "W1", "--time-limit", "1"]        # default output into out/
            files = {}
        cases.append(Case(f, f"{args[0]}-at-{at}s-{i}", ANY, args, files=files, interrupt_after_s=at, timeout_s=40))
    return cases


def fam_scale(rng: random.Random, n: int) -> list[Case]:
    """Sizes a user may try that are legal-looking but large: bounded time, no crash."""
    f = "scale"
    ones = ",".join(["1"] * 5000)

    def many_ops(base):
        plan = base.plan("solved-W1")
        plan["nano_ops"] = plan["nano_ops"] * 1000
        return dump_json(plan)

    def own_streams(base):
        plan = base.plan("W2")
        for op in plan["nano_ops"]:
            op["stream"] = f"s{op['order']}"
        plan["streams"] = sorted({op["stream"] for op in plan["nano_ops"]})
        return dump_json(plan)

    big_model = {**LLAMA_YAML, "hidden_size": 10 ** 6, "intermediate_size": 4 * 10 ** 6, "head_dim": 31250}
    cases = [
        Case(f, "analyze-5000-prompts", ANY, _analyze("--model", "llama-3-8b", "--decode", "64", "--prefill", ones)),
        Case(f, "solve-2000-prompts", ANY, ["solve", "--model", "llama-3-8b", "--decode", "64", "--prefill",
                                            ",".join(["1"] * 2000), *SOLVE_FAST, "-o", "p.json"], timeout_s=60),
        Case(f, "workload-100k-prompts", ANY, _analyze("--workload", "w.yaml"),
             files={"w.yaml": dump_yaml({**SMALL_WORKLOAD, "prefill_lengths": [1] * 100_000})}, timeout_s=60),
        Case(f, "solve-layers-64", ANY, ["solve", "--workload", "W1", "--layers", "64", *SOLVE_FAST, "-o", "p.json"],
             timeout_s=60),
        Case(f, "solve-chunk-1", ANY, ["solve", "--workload", "W2", "--chunk", "1", *SOLVE_FAST, "-o", "p.json"],
             timeout_s=60),
        Case(f, "solve-decode-100k", ANY, ["solve", "--model", "llama-3-8b", "--decode", "100000", *SOLVE_FAST,
                                           "-o", "p.json"], timeout_s=60),
        Case(f, "analyze-context-1e7", ANY, _analyze("--model", "llama-3-8b", "--decode", "64", "--context",
                                                     str(10 ** 7))),
        Case(f, "analyze-decode-1e6", ANY, _analyze("--model", "llama-3-8b", "--decode", str(10 ** 6))),
        Case(f, "simulate-18k-duplicate-ops", BAD, ["simulate", "plan.json", "-o", "sim"],
             files={"plan.json": Maker(many_ops)}, timeout_s=60),
        Case(f, "simulate-own-stream-per-op", ANY, ["simulate", "plan.json", "-o", "sim"],
             files={"plan.json": Maker(own_streams)}),
        Case(f, "analyze-model-1e6-layers", ANY, _analyze("--model", "m.yaml", "--workload", "W2"),
             files={"m.yaml": dump_yaml({**LLAMA_YAML, "num_layers": 10 ** 6})}),
        Case(f, "solve-model-hidden-1e6", ANY, ["solve", "--model", "m.yaml", *SMALL_WL, *SOLVE_FAST, "-o", "p.json"],
             files={"m.yaml": dump_yaml(big_model)}, timeout_s=60),
        Case(f, "profile-model-hidden-1e6", ANY, ["profile", "--analytic", "--model", "m.yaml", *SMALL_WL, "-o", "p.csv"],
             files={"m.yaml": dump_yaml(big_model)}, timeout_s=60),
        Case(f, "unicode-input-names", VALID, _analyze("--model", "模型 ł.yaml", "--workload", "wł 負荷.yaml"),
             files={"模型 ł.yaml": dump_yaml(LLAMA_YAML), "wł 負荷.yaml": dump_yaml(SMALL_WORKLOAD)}),
        Case(f, "unicode-plan-name", VALID, ["simulate", "plän 計画.json"],
             files={"plän 計画.json": Maker(lambda b: dump_json(b.plan("solved-W1")))}),
    ]
    for i in range(n):
        d = rng.choice([1, 7, 129, 4097, 65536])
        c = rng.choice([1, 100, 1023, 8192, 131072])
        p = ",".join(str(rng.choice([1, 17, 512, 4096, 32768])) for _ in range(rng.randint(0, 6)))
        args = ["solve", "--model", "llama-3-8b", "--decode", str(d), "--context", str(c), *SOLVE_FAST, "-o", "p.json"]
        if p:
            args += ["--prefill", p]
        cases.append(Case(f, f"solve-d{d}-c{c}-p{len(p.split(','))}-{i}", ANY, args, timeout_s=60))
    return cases


def fam_profile_cmd(rng: random.Random, n: int) -> list[Case]:
    f = "profile-cmd"
    cases = [
        Case(f, "analytic-csv", VALID, ["profile", "--analytic", "--workload", "W1", "-o", "a.csv"],
             check=_only_files("a.csv")),
        Case(f, "analytic-parquet", VALID, ["profile", "--analytic", "--workload", "W2", "-o", "a.parquet"],
             check=_only_files("a.parquet")),
        Case(f, "analytic-a100", VALID, ["profile", "--analytic", "--gpu", "a100-sxm", "--workload", "W1", "-o", "a.csv"],
             check=_only_files("a.csv")),
        Case(f, "analytic-gpu-unknown", BAD, ["profile", "--analytic", "--gpu", "zzz", "--workload", "W1", "-o", "a.csv"]),
        Case(f, "measure-needs-cuda", VALID, ["profile", "--workload", "W1", "-o", "m.parquet"], needs_gpu=True,
             check=_only_files("m.parquet")),
        Case(f, "measure-quick-needs-cuda", VALID, ["profile", "--quick", "--workload", "W1", "-o", "m.csv"],
             needs_gpu=True, check=_only_files("m.csv")),
        Case(f, "measure-gpu-id-neg", BAD, ["profile", "--gpu-id", "-1", "--workload", "W1", "-o", "m.csv"]),
        Case(f, "analytic-no-workload", BAD, ["profile", "--analytic", "--model", "llama-3-8b", "-o", "a.csv"]),
    ]
    for i in range(n):
        gpu = _pick(rng, ["h100-sxm", "h200", "a100-sxm", "H200", "", SURROGATE])
        wl = _pick(rng, ["W1", "W2", "W3", "W4", "W5"])
        validity = VALID if gpu in ("h100-sxm", "h200", "a100-sxm") else (ANY if gpu == "H200" else BAD)
        out = f"a{i}.csv"
        cases.append(Case(f, f"analytic-{gpu}-{wl}-{i}", validity,
                          ["profile", "--analytic", "--gpu", gpu, "--workload", wl, "-o", out],
                          check=_only_files(out) if validity == VALID else None, timeout_s=40))
    return cases


def fam_check(rng: random.Random, n: int) -> list[Case]:
    """`check --cases FILE` with a broken cases file (exit 1 means a regression report)."""
    f = "check"
    golden = {"W1.plan.json": Maker(lambda b: dump_json(b.plan("W1")))}
    good = {"name": "W1", "model": "llama-3-8b", "workload": "W1", "profile": "default", "plan": "W1.plan.json",
            "solver": "cpsat", "time_limit_s": 1, "threads": 2, "seed": 0}

    def cases_file(data):
        return dump_yaml(data)

    def c(name, validity, data, extra=None):
        return Case(f, name, validity, ["check", "--cases", "cases.yaml"],
                    files={**golden, "cases.yaml": cases_file(data), **(extra or {})}, allowed_rcs=(0, 1, 2, 130),
                    timeout_s=40)

    cases = [
        c("ok", ANY, {"tolerance": 0.5, "cases": [good]}),
        c("tolerance-abc", BAD, {"tolerance": "abc", "cases": [good]}),
        c("tolerance-nan", BAD, {"tolerance": float("nan"), "cases": [good]}),
        c("tolerance-neg", BAD, {"tolerance": -1, "cases": [good]}),
        c("cases-not-list", BAD, {"tolerance": 0.02, "cases": "W1"}),
        c("cases-empty", ANY, {"tolerance": 0.02, "cases": []}),
        c("case-not-mapping", BAD, {"tolerance": 0.02, "cases": [5]}),
        c("case-missing-plan", BAD, {"tolerance": 0.02, "cases": [{k: v for k, v in good.items() if k != "plan"}]}),
        c("case-plan-missing-file", BAD, {"tolerance": 0.02, "cases": [{**good, "plan": "nope.json"}]}),
        c("case-time-limit-nan", BAD, {"tolerance": 0.02, "cases": [{**good, "time_limit_s": float("nan")}]}),
        c("case-seed-huge", BAD, {"tolerance": 0.02, "cases": [{**good, "seed": 2 ** 70}]}),
        c("case-solver-unknown", BAD, {"tolerance": 0.02, "cases": [{**good, "solver": "glpk"}]}),
        c("case-profile-missing", BAD, {"tolerance": 0.02, "cases": [{**good, "profile": "nope.parquet"}]}),
        c("case-unknown-key", BAD, {"tolerance": 0.02, "cases": [{**good, "colour": "red"}]}),
        c("case-workload-unknown", BAD, {"tolerance": 0.02, "cases": [{**good, "workload": "W9"}]}),
        Case(f, "cases-missing", BAD, ["check", "--cases", "nope.yaml"]),
        Case(f, "cases-deep", BAD, ["check", "--cases", "c.yaml"], files={"c.yaml": nested_yaml(100_000)}),
        Case(f, "tolerance-flag-nan", BAD, ["check", "--cases", "nope.yaml", "--tolerance", "nan"]),
    ]
    for i in range(n):
        key = _pick(rng, list(good))
        value = _pick(rng, [None, -1, "x", SURROGATE, [], 1.5])
        cases.append(c(f"case {key}={_short(value)}-{i}", BAD, {"tolerance": 0.02, "cases": [{**good, key: value}]}))
    return cases


def fam_run_tune(rng: random.Random, n: int) -> list[Case]:
    f = "run-tune"
    plan = {"plan.json": Maker(lambda b: dump_json(b.plan("solved-W1")))}
    cases = [
        Case(f, "run-needs-cuda", VALID, ["run", "--schedule", "plan.json"], files=plan, needs_gpu=True),
        Case(f, "run-layers-mismatch", BAD, ["run", "--schedule", "plan.json", "--layers", "3"], files=plan),
        Case(f, "run-iters-neg", BAD, ["run", "--schedule", "plan.json", "--iters", "-1"], files=plan),
        Case(f, "run-iters-0", BAD, ["run", "--schedule", "plan.json", "--iters", "0"], files=plan),
        Case(f, "run-out-is-file", BAD, ["run", "--schedule", "plan.json", "--out", "f.txt"],
             files={**plan, "f.txt": b"x"}),
        Case(f, "run-missing-plan", BAD, ["run", "--schedule", "nope.json"]),
        Case(f, "run-profile-other", BAD, ["run", "--schedule", "plan.json", "--profile", "a.csv"],
             files={**plan, "a.csv": _profile_maker("csv", _rows_set("time_ms", 1.0, which="all", op="kqv"))}),
        Case(f, "tune-empty-plans", BAD, ["tune", "--plans", "plans", "-o", "best.json"], files={"plans": DIR}),
        Case(f, "tune-bad-plan", BAD, ["tune", "--plans", "plans", "-o", "best.json"],
             files={"plans/a.json": b"{}"}),
        Case(f, "tune-plans-needs-cuda", VALID, ["tune", "--plans", "plans", "-o", "best.json"],
             files={"plans/a.json": Maker(lambda b: dump_json(b.plan("solved-W1")))}, needs_gpu=True),
        Case(f, "tune-k-neg", BAD, ["tune", "--plans", "plans", "-k", "-1", "-o", "best.json"],
             files={"plans/a.json": Maker(lambda b: dump_json(b.plan("solved-W1")))}),
        Case(f, "tune-o-dir", BAD, ["tune", "--plans", "plans", "-o", "best.json"],
             files={"plans/a.json": Maker(lambda b: dump_json(b.plan("solved-W1"))), "best.json": DIR}),
        Case(f, "tune-solve-needs-cuda", VALID, ["tune", "--workload", "W1", "--time-limit", "1", "-o", "best.json"],
             needs_gpu=True, timeout_s=40),
        Case(f, "tune-time-limit-nan", BAD, ["tune", "--workload", "W1", "--time-limit", "nan", "-o", "best.json"],
             timeout_s=40),
    ]
    for i in range(n):
        flag = _pick(rng, ["--mode", "--iters", "--layers"])
        value = _pick(rng, {"--mode": ["green", "grid", "GREEN", "", SURROGATE],
                            "--iters": ["-1", "0", str(2 ** 70), "nan"],
                            "--layers": ["0", "-1", "2", str(2 ** 70)]}[flag])
        validity = BAD
        if (flag, value) in (("--mode", "green"), ("--mode", "grid"), ("--layers", "2")):
            validity = VALID
        cases.append(Case(f, f"run {flag} {_short(value)}-{i}", validity, ["run", "--schedule", "plan.json", flag, value],
                          files=plan, needs_gpu=validity == VALID))
    return cases


def fam_entry(rng: random.Random, n: int) -> list[Case]:
    """Real interpreters: `python -m nfsearch` and the `nfsearch` script, surrogate bytes in argv."""
    f = "entry"
    cases = [
        Case(f, "module-help", VALID, ["--help"], mode="subprocess"),
        Case(f, "script-version", VALID, ["--version"], mode="subprocess", entry="script"),
        Case(f, "script-unknown-option", BAD, ["analyze", "--frobnicate"], mode="subprocess", entry="script"),
        Case(f, "module-seed-2**70", BAD, ["solve", "--workload", "W1", "--seed", str(2 ** 70), *SOLVE_FAST, "-o", "p.json"],
             mode="subprocess", timeout_s=40),
        Case(f, "module-model-surrogate-bytes", BAD, ["analyze", "--model", f"m{SURROGATE}", "--workload", "W2"],
             mode="subprocess"),
        Case(f, "module-model-surrogate-yaml", BAD, ["analyze", "--model", f"m{SURROGATE}.yaml", "--workload", "W2"],
             mode="subprocess"),
        Case(f, "module-analyze-ok", VALID, ["analyze", "--workload", "W2"], mode="subprocess"),
        Case(f, "script-simulate-ok", VALID, ["simulate", "plan.json", "-o", "sim"],
             files={"plan.json": Maker(lambda b: dump_json(b.plan("solved-W1")))}, mode="subprocess", entry="script"),
        Case(f, "module-deep-plan", BAD, ["simulate", "plan.json"], files={"plan.json": nested_json(100_000)},
             mode="subprocess"),
        Case(f, "module-output-surrogate", ANY, ["profile", "--analytic", "--workload", "W1", "-o", f"a{SURROGATE}.csv"],
             mode="subprocess"),
    ]
    return cases


FAMILIES: dict[str, tuple[Callable, float]] = {
    # name: (generator, share of the random cases)
    "usage": (fam_usage, 0.03),
    "flags": (fam_flags, 0.10),
    "solve-flags": (fam_solve_flags, 0.05),
    "outputs": (fam_outputs, 0.02),
    "plan": (fam_plans, 0.25),
    "plan-raw": (fam_plan_raw, 0.01),
    "compare": (fam_compare, 0.01),
    "model-yaml": (fam_model_yaml, 0.12),
    "model-hf": (fam_model_hf, 0.10),
    "workload-yaml": (fam_workload_yaml, 0.11),
    "profile-table": (fam_profiles, 0.14),
    "profile-cmd": (fam_profile_cmd, 0.02),
    "check": (fam_check, 0.01),
    "run-tune": (fam_run_tune, 0.03),
    "entry": (fam_entry, 0.0),
    "interrupt": (fam_interrupt, 0.01),
    "scale": (fam_scale, 0.02),
}


def generate(seed: int = 0, num_random: int = 600, families: list[str] | None = None) -> list[Case]:
    """The fixed cases of every family plus about `num_random` seeded random ones spread by share."""
    cases = []
    for name, (gen, share) in FAMILIES.items():
        if families and name not in families:
            continue
        rng = random.Random(f"{seed}:{name}")
        cases += gen(rng, round(num_random * share))
    return cases


# ---- running --------------------------------------------------------------------------------------

@dataclass
class Result:
    case: Case
    rc: int | None
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool
    new_files: list[str]
    failures: list[str] = field(default_factory=list)
    detail: str = ""

    def first_error(self) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        tb_last = next((ln for ln in reversed(lines) if not ln.startswith(" ")), "") if "Traceback" in self.stderr else ""
        text = tb_last or (lines[0] if lines else "")
        return text[:200]

    def to_dict(self) -> dict:
        return {"family": self.case.family, "name": self.case.name, "validity": self.case.validity,
                "command": self.case.command(), "rc": self.rc, "timed_out": self.timed_out,
                "wall_s": round(self.wall_s, 3), "failures": self.failures, "detail": self.detail,
                "new_files": self.new_files, "first_error": self.first_error(), "stderr_tail": self.stderr[-2000:]}


def _write_inputs(case: Case, folder: Path, base: Base | None) -> None:
    for rel, spec in case.files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if spec == DIR:
            path.mkdir(exist_ok=True)
        elif isinstance(spec, tuple) and spec[0] == "symlink":
            os.symlink(spec[1], path)
        elif isinstance(spec, Maker):
            path.write_bytes(spec.make(base))
        else:
            path.write_bytes(spec)


def _input_paths(case: Case) -> set[str]:
    paths = set()
    for rel in case.files:
        parts = Path(rel).parts
        for i in range(1, len(parts) + 1):
            paths.add(str(Path(*parts[:i])))
    return paths


def _listing(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(os.fsencode(folder)):
        for name in dirs + files:
            rel = os.path.relpath(os.path.join(root, name), os.fsencode(folder))
            out.append(os.fsdecode(rel))
    return sorted(out)


def _child_main(case: Case, folder: Path, out_path: Path, err_path: Path, base: Base | None) -> None:
    """In the forked process: set up like a fresh `python -m nfsearch`, run, and _exit with its code."""
    rc = FUZZER_ERROR_RC
    try:
        os.setsid()
        fd_out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fd_err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fd_in = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd_in, 0)
        os.dup2(fd_out, 1)
        os.dup2(fd_err, 2)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="strict")
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                      errors="backslashreplace", line_buffering=True)
        sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            _write_inputs(case, folder, base)
            os.chdir(folder)
        except Exception:
            sys.stderr.write("FUZZER: could not write the case's inputs\n")
            traceback.print_exc()
            raise SystemExit(FUZZER_ERROR_RC) from None
        rc = _run_module(case.args)
    except BaseException:               # noqa: BLE001 - the fuzzer must report, not die
        try:
            traceback.print_exc()
        except BaseException:            # noqa: BLE001
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:        # noqa: BLE001
                pass
        os._exit(rc)


def _run_module(args: list[str]) -> int:
    """`python -m nfsearch ARGS` in this process, with the interpreter's exit-code rules."""
    import runpy
    sys.argv = ["nfsearch", *args]
    try:
        runpy.run_module("nfsearch", run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code & 0xFF
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseException:                # noqa: BLE001 - an uncaught exception: what python prints
        traceback.print_exc()
        return 1


class _Job:
    def __init__(self, index: int, case: Case, folder: Path, logs: Path, base: Base | None):
        self.index, self.case, self.folder = index, case, folder
        self.out_path, self.err_path = logs / f"{index}.out", logs / f"{index}.err"
        self.start = time.monotonic()
        self.proc = None
        self.pid = None
        self.is_interrupted = False
        folder.mkdir(parents=True)
        if case.mode == "fork":
            pid = os.fork()
            if pid == 0:
                _child_main(case, folder, self.out_path, self.err_path, base)
            self.pid = pid
        else:
            writer = os.fork()
            if writer == 0:
                code = 0
                try:
                    _write_inputs(case, folder, base)
                except BaseException:    # noqa: BLE001
                    code = FUZZER_ERROR_RC
                os._exit(code)
            os.waitpid(writer, 0)
            if case.entry == "script":
                exe = shutil.which("nfsearch") or str(Path(sys.executable).parent / "nfsearch")
                argv = [exe]
            else:
                argv = [sys.executable, "-m", "nfsearch"]
            argv += [os.fsencode(a) for a in case.args]
            with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
                self.proc = subprocess.Popen(argv, cwd=folder, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                             start_new_session=True,
                                             preexec_fn=lambda: resource.setrlimit(
                                                 resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES)))
            self.pid = self.proc.pid
        self.start = time.monotonic()

    def poll(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> int | None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc is not None:
            return self.proc.wait()
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def run_cases(cases: list[Case], workdir: Path, jobs: int | None = None, base: Base | None = None,
              progress: Callable[[int, int], None] | None = None, timeout_scale: float = 1.0) -> list[Result]:
    """Run every case (at most `jobs` at a time) and classify the outcomes."""
    workdir = Path(workdir)
    logs = workdir / "_logs"
    logs.mkdir(parents=True, exist_ok=True)
    jobs = jobs or max(2, os.cpu_count() or 2)
    pending = list(enumerate(cases))[::-1]
    running: list[_Job] = []
    results: dict[int, Result] = {}
    while pending or running:
        while pending and len(running) < jobs:
            index, case = pending.pop()
            running.append(_Job(index, case, workdir / f"c{index:05d}", logs, base))
        time.sleep(0.005)
        for job in list(running):
            rc = job.poll()
            timed_out = False
            elapsed = time.monotonic() - job.start
            if rc is None and job.case.interrupt_after_s is not None and not job.is_interrupted \
                    and elapsed > job.case.interrupt_after_s:
                try:
                    os.killpg(job.pid, signal.SIGINT)      # what Ctrl-C in a terminal sends
                except (ProcessLookupError, PermissionError):
                    pass
                job.is_interrupted = True
            if rc is None and elapsed > job.case.timeout_s * timeout_scale:
                job.kill()
                rc, timed_out = None, True
            if rc is None and not timed_out:
                continue
            running.remove(job)
            results[job.index] = _collect(job, rc, timed_out, elapsed)
            if progress:
                progress(len(results), len(cases))
    return [results[i] for i in range(len(cases))]


def _read(path: Path, limit: int = 200_000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    if len(data) > limit:
        data = data[: limit // 2] + b"\n...\n" + data[-limit // 2:]
    return data.decode("utf-8", "backslashreplace")


def _collect(job: _Job, rc: int | None, timed_out: bool, elapsed: float) -> Result:
    inputs = _input_paths(job.case)
    new = [p for p in _listing(job.folder) if p not in inputs]
    result = Result(job.case, rc, _read(job.out_path), _read(job.err_path), elapsed, timed_out, new)
    classify(result, job.folder.name)
    return result


def classify(result: Result, case_dir: str = "") -> Result:
    case, rc, err = result.case, result.rc, result.stderr
    fails, detail = [], []
    if rc == FUZZER_ERROR_RC and "FUZZER:" in err:
        fails.append("fuzzer-error")
    elif result.timed_out:
        fails.append("hang")
    else:
        if "Traceback (most recent call last)" in err or rc not in case.allowed_rcs:
            fails.append("traceback")
        if rc != 0 and result.new_files:
            fails.append("partial")
            detail.append(f"left {result.new_files[:5]}")
        if rc == 2:
            problem = error_format_problem(err)
            if problem:
                fails.append("error-format")
                detail.append(problem)
        if case.validity == BAD and rc == 0:
            fails.append("accepted-bad")
        if case.validity == VALID and rc != 0 and not (case.needs_gpu and rc == 2) and "traceback" not in fails:
            fails.append("rejected-good")
        stray = [p for p in result.new_files if _is_stray(p)]
        if rc == 0 and stray:
            fails.append("wrong-output")
            detail.append(f"stray files {stray[:3]}")
        if case.validity == VALID and rc == 0 and case.check is not None:
            problem = case.check(result.stdout, result.new_files, case_dir)
            if problem:
                fails.append("wrong-output")
                detail.append(problem)
    result.failures = fails
    result.detail = "; ".join(detail)
    return result


def _is_stray(path: str) -> bool:
    """A temporary or checkpoint file a finished command must not leave (.NAME.xxxx, *.partial*, *.tmp)."""
    name = os.path.basename(path)
    return (name.startswith(".") and name.count(".") >= 2) or ".partial" in name or name.endswith((".tmp", "~"))


def error_format_problem(stderr: str) -> str | None:
    """None if stderr ends in exactly one `nfsearch: error:` line after progress/note lines only."""
    lines = stderr.rstrip("\n").split("\n") if stderr.strip() else []
    errors = [ln for ln in lines if ln.startswith("nfsearch: error:")]
    if len(errors) != 1:
        return f"{len(errors)} 'nfsearch: error:' lines"
    if lines[-1] != errors[0]:
        return "the error line is not the last line"
    for line in lines[:-1]:
        if not (line.startswith("  ") or line.startswith(("note:", "warning:"))):
            return f"extra stderr line {line[:80]!r}"
    return None


# ---- reporting ------------------------------------------------------------------------------------

def summarize(results: list[Result]) -> dict:
    cols = FAILURES + ("fuzzer-error",)
    total = {"cases": 0, "ok": 0, **{c: 0 for c in cols}}
    families: dict[str, dict] = {}
    for r in results:
        fam = families.setdefault(r.case.family, {"cases": 0, "ok": 0, **{c: 0 for c in cols}})
        for row in (total, fam):
            row["cases"] += 1
            if not r.failures:
                row["ok"] += 1
            for c in r.failures:
                row[c] += 1
    by_validity = {v: sum(1 for r in results if r.case.validity == v) for v in (VALID, BAD, ANY)}
    return {"total": total, "families": families, "by_validity": by_validity}


def format_table(summary: dict) -> str:
    cols = ["cases", "ok"] + list(FAILURES) + (["fuzzer-error"] if summary["total"]["fuzzer-error"] else [])
    width = max(len(f) for f in list(summary["families"]) + ["family", "TOTAL"])
    head = f"{'family':<{width}} " + " ".join(f"{c:>{max(len(c), 5)}}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, row in sorted(summary["families"].items()):
        lines.append(f"{name:<{width}} " + " ".join(f"{row[c]:>{max(len(c), 5)}}" for c in cols))
    lines.append("-" * len(head))
    row = summary["total"]
    lines.append(f"{'TOTAL':<{width}} " + " ".join(f"{row[c]:>{max(len(c), 5)}}" for c in cols))
    v = summary["by_validity"]
    lines.append(f"(inputs: {v[VALID]} valid, {v[BAD]} bad, {v[ANY]} either)")
    return "\n".join(lines)


def format_failures(results: list[Result], limit: int | None = None) -> str:
    failing = [r for r in results if r.failures]
    lines = []
    for r in failing[:limit]:
        lines.append(f"[{','.join(r.failures)}] {r.case.family} / {r.case.name} ({r.case.validity}, rc {r.rc}, "
                     f"{r.wall_s:.1f} s)")
        lines.append(f"    $ {r.case.command()}")
        err = r.first_error()
        if err:
            lines.append(f"    stderr: {err}")
        if r.detail:
            lines.append(f"    note: {r.detail[:200]}")
    if limit is not None and len(failing) > limit:
        lines.append(f"... and {len(failing) - limit} more")
    return "\n".join(lines)


def preload() -> None:
    """Import the package and its heavy libraries once, so forked cases skip that cost."""
    import importlib
    import pkgutil

    import nfsearch
    for mod in pkgutil.walk_packages(nfsearch.__path__, "nfsearch."):
        if mod.name.startswith("nfsearch.runtime") or mod.name == "nfsearch.__main__":
            continue
        try:
            importlib.import_module(mod.name)
        except Exception:                # noqa: BLE001 - a module mid-edit elsewhere: the cases will show it
            pass
    for name in ("matplotlib", "matplotlib.pyplot", "pandas", "pyarrow", "pyarrow.parquet", "jsonschema",
                 "networkx", "ortools.sat.python.cp_model"):
        try:
            importlib.import_module(name)
        except Exception:                # noqa: BLE001
            pass
