"""Profile tables: CSV/Parquet round trips, bilinear interpolation, misses, extrapolation, bad files.

All timings here are fake (meta source "fake")."""

import json
import re

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import TINY_MODEL, TINY_WL, fake_meta, fake_profile, table_from_points

from nfsearch.errors import NfsearchError
from nfsearch.profile import CSV_MARK, ProfileGrid, ProfileMiss, ProfileTable, bracket, gpu_from_profile, load
from nfsearch.roofline import analytic_profile
from nfsearch.specs import load_gpu

# time = tokens / sm at the grid points
GRID = {("kqv", 0): {(t, s): t / s for t in (100, 200) for s in (10, 20)}}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_round_trip(tmp_path, suffix):
    table = fake_profile()
    path = tmp_path / f"p{suffix}"
    table.write(path)
    back = load(path)
    assert back.meta == table.meta
    assert back.fingerprint() == table.fingerprint()
    assert len(back.rows) == len(table.rows)
    # CSV keeps 6 significant digits (what the fingerprint hashes); Parquet keeps every bit
    assert back.time_ms("kqv", 128, 70)[0] == pytest.approx(table.time_ms("kqv", 128, 70)[0], rel=1e-6)
    if suffix == ".parquet":
        assert back.rows.equals(table.rows)
    assert not back.is_analytic and back.label == "fake profile of Fake GPU"


def test_csv_and_parquet_agree(tmp_path):
    table = analytic_profile(TINY_MODEL, TINY_WL, load_gpu("h100-sxm"))
    table.write(tmp_path / "a.csv")
    table.write(tmp_path / "a.parquet")
    a, b = load(tmp_path / "a.csv"), load(tmp_path / "a.parquet")
    assert a.fingerprint() == b.fingerprint() == table.fingerprint()
    assert a.meta == b.meta and a.is_analytic
    assert (tmp_path / "a.csv").read_text().startswith(CSV_MARK)


def test_corun_rows_round_trip(tmp_path):
    rows = pd.DataFrame([("kqv", "fake", 128, 0, 70, 1.0, ""), ("kqv", "fake", 128, 0, 70, 1.5, "memory")],
                        columns=["op", "impl", "num_tokens", "context", "sm_count", "time_ms", "co_class"])
    table = ProfileTable(rows, fake_meta())
    assert table.has_corun()
    for suffix in (".csv", ".parquet"):
        table.write(tmp_path / f"c{suffix}")
        back = load(tmp_path / f"c{suffix}")
        assert back.fingerprint() == table.fingerprint()
        assert back.time_ms("kqv", 128, 70, co_class="memory")[0] == 1.5
        assert back.time_ms("kqv", 128, 70)[0] == 1.0


def test_bilinear_interpolation_exact():
    table = table_from_points(GRID)
    # grid points are returned as they are
    assert table.time_ms("kqv", 100, 10) == (10.0, "fake")
    assert table.time_ms("kqv", 200, 20) == (10.0, "fake")
    # corners: (100,10)=10, (200,10)=20, (100,20)=5, (200,20)=10
    # at 150 tokens, 15 SMs: s0 row 15, s1 row 7.5 -> 11.25
    assert table.time_ms("kqv", 150, 15)[0] == pytest.approx(11.25, abs=1e-12)
    # at 125 tokens, 12 SMs: s0 = 12.5, s1 = 6.25, weight 0.2 -> 11.25
    assert table.time_ms("kqv", 125, 12)[0] == pytest.approx(12.5 + (6.25 - 12.5) * 0.2, abs=1e-12)
    # along one axis only
    assert table.time_ms("kqv", 100, 15)[0] == pytest.approx(7.5, abs=1e-12)
    assert table.time_ms("kqv", 150, 20)[0] == pytest.approx(7.5, abs=1e-12)


def test_interpolation_over_context():
    points = {("decode_attn", 512): {(128, 100): 1.0}, ("decode_attn", 1024): {(128, 100): 3.0}}
    table = table_from_points(points)
    assert table.time_ms("decode_attn", 128, 100, context=768)[0] == pytest.approx(2.0)
    with pytest.raises(ProfileMiss, match="context 2048"):
        table.time_ms("decode_attn", 128, 100, context=2048)


def test_fastest_impl_is_chosen():
    rows = pd.DataFrame([("kqv", "slow", 128, 0, 100, 2.0), ("kqv", "fast", 128, 0, 100, 1.0)],
                        columns=["op", "impl", "num_tokens", "context", "sm_count", "time_ms"])
    table = ProfileTable(rows, fake_meta())
    assert table.time_ms("kqv", 128, 100) == (1.0, "fast")
    assert table.time_ms("kqv", 128, 100, impl="slow") == (2.0, "slow")
    with pytest.raises(ProfileMiss, match="impl nope"):
        table.time_ms("kqv", 128, 100, impl="nope")


@pytest.mark.parametrize("tokens,sms", [(300, 10), (50, 15), (150, 5), (150, 40)])
def test_outside_grid_is_a_miss_naming_op_size_and_sms(tokens, sms):
    table = table_from_points(GRID)
    with pytest.raises(ProfileMiss) as err:
        table.time_ms("kqv", tokens, sms)
    msg = str(err.value)
    assert "kqv" in msg and f"{tokens} tokens" in msg and f"{sms} SMs" in msg
    assert isinstance(err.value, NfsearchError)


def test_unknown_op_is_a_miss():
    with pytest.raises(ProfileMiss, match="op ug"):
        table_from_points(GRID).time_ms("ug", 100, 10)


def test_missing_grid_corner_is_a_miss():
    points = {("kqv", 0): {(100, 10): 1.0, (200, 20): 2.0}}
    with pytest.raises(ProfileMiss, match="kqv"):
        table_from_points(points).time_ms("kqv", 150, 15)


def test_extrapolation_when_allowed():
    table = table_from_points(GRID)
    # above the token grid: linear in tokens from the edge (400 tokens at 10 SMs: 20 * 2)
    assert table.time_ms("kqv", 400, 10, allow_extrapolation=True)[0] == pytest.approx(40.0)
    # below the SM grid: never (the table's SM grid is what the device partitions into)
    with pytest.raises(ProfileMiss, match="smallest SM count is 10"):
        table.time_ms("kqv", 100, 5, allow_extrapolation=True)
    # below the token grid / above the SM grid: clamped to the edge
    assert table.time_ms("kqv", 50, 10, allow_extrapolation=True)[0] == pytest.approx(10.0)
    assert table.time_ms("kqv", 100, 40, allow_extrapolation=True)[0] == pytest.approx(5.0)


def _write_csv(path, meta, df):
    path.write_text(CSV_MARK + json.dumps(meta) + "\n" + df.to_csv(index=False))


def _frame(drop=None):
    df = pd.DataFrame([("kqv", "fake", 128, 0, 100, 1.0)],
                      columns=["op", "impl", "num_tokens", "context", "sm_count", "time_ms"])
    return df.drop(columns=[drop]) if drop else df


def test_missing_column(tmp_path):
    _write_csv(tmp_path / "p.csv", fake_meta(), _frame(drop="sm_count"))
    with pytest.raises(NfsearchError, match="sm_count"):
        load(tmp_path / "p.csv")
    with pytest.raises(NfsearchError, match="time_ms"):
        ProfileTable(_frame(drop="time_ms"), fake_meta())


@pytest.mark.parametrize("meta,match", [
    ({k: v for k, v in fake_meta().items() if k != "num_sms"}, "num_sms"),
    ({**fake_meta(), "source": "guessed"}, "source"),
    ([1, 2, 3], "metadata must be a JSON object"),
    (7, "metadata must be a JSON object"),
    ({**fake_meta(), "num_sms": "abc"}, "profile metadata: num_sms should be a valid integer (got 'abc')"),
    ({**fake_meta(), "num_sms": 100.0}, "num_sms should be a valid integer"),
    ({**fake_meta(), "num_sms": 0}, "num_sms should be greater than or equal to 1"),
    ({**fake_meta(), "sm_granularity": 101}, "sm_granularity 101 exceeds num_sms 100"),
    ({**fake_meta(), "gpu_name": ""}, "gpu_name should have at least 1 character"),
    ({**fake_meta(), "gpu_name": "a\u0007"}, "gpu_name must be printable"),
    ({**fake_meta(), "peak_tflops": -1}, "peak_tflops should be greater than 0"),
    ({**fake_meta(), "tp_degree": True}, "tp_degree should be a valid integer"),
])
def test_bad_metadata(tmp_path, meta, match):
    _write_csv(tmp_path / "p.csv", meta, _frame())
    with pytest.raises(NfsearchError, match=re.escape(match)):
        load(tmp_path / "p.csv")


@pytest.mark.parametrize("content,match", [
    ("op,impl,num_tokens,context,sm_count,time_ms\nkqv,fake,128,0,100,1.0\n", "metadata line"),
    (CSV_MARK + "{not json\nop\n", "profile metadata: malformed JSON"),
    (CSV_MARK + json.dumps(fake_meta()) + "\nop,impl,num_tokens,context,sm_count,time_ms\n"
     "kqv,fake,many,0,100,1.0\n", "column num_tokens must hold integers"),
    (CSV_MARK + json.dumps(fake_meta()) + "\nop,impl,num_tokens,context,sm_count,time_ms\n"
     "kqv,fake,128,0,100,-1.0\n", "not a positive finite time"),
    (CSV_MARK + json.dumps(fake_meta()) + "\nop,impl,num_tokens,context,sm_count,time_ms\n"
     "kqv,fake,128,0,100,\n", "time_ms must hold numbers"),
])
def test_bad_csv(tmp_path, content, match):
    (tmp_path / "p.csv").write_text(content)
    with pytest.raises(NfsearchError, match=match):
        load(tmp_path / "p.csv")


def test_bad_parquet_and_paths(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(NfsearchError, match="not a readable"):
        load(tmp_path / "junk.parquet")
    _frame().to_parquet(tmp_path / "nometa.parquet")
    with pytest.raises(NfsearchError, match="metadata"):
        load(tmp_path / "nometa.parquet")
    with pytest.raises(NfsearchError, match="no such profile"):
        load(tmp_path / "absent.csv")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(NfsearchError, match=".csv or .parquet"):
        load(tmp_path / "p.txt")
    with pytest.raises(NfsearchError, match=".csv or .parquet"):
        fake_profile().write(tmp_path / "p.xlsx")
    with pytest.raises(NfsearchError, match="cannot write"):
        fake_profile().write(tmp_path / "nodir" / "p.csv")
    assert not (tmp_path / "nodir").exists() and not (tmp_path / "p.xlsx").exists()


def test_analytic_profile_shape():
    gpu = load_gpu("h100-sxm")
    table = analytic_profile(TINY_MODEL, TINY_WL, gpu)
    assert table.is_analytic and table.meta["num_sms"] == 132
    assert set(table.rows["sm_count"]) == set(gpu.sm_grid())
    # more SMs never slower for a GEMM at a grid point
    t_small = table.time_ms("kqv", 1024, 8)[0]
    t_full = table.time_ms("kqv", 1024, 132)[0]
    assert t_full < t_small


# ---- tables that must not crash or fool it --------------------------------------------------------

def _one_line(call, match) -> str:
    with pytest.raises(NfsearchError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and match in message, message
    return message


def _rows(*rows, co_class=False):
    columns = ["op", "impl", "num_tokens", "context", "sm_count", "time_ms"] + (["co_class"] if co_class else [])
    return pd.DataFrame(list(rows), columns=columns)


@pytest.mark.parametrize("time_ms", ["inf", "-inf", "1e300", "-1", "0", "1e400", "nan", "NaN"])
def test_bad_times_in_csv(tmp_path, time_ms):
    path = tmp_path / "p.csv"
    path.write_text(CSV_MARK + json.dumps(fake_meta()) + "\nop,impl,num_tokens,context,sm_count,time_ms\n"
                    f"kqv,fake,128,0,100,1.0\nkqv,fake,256,0,100,{time_ms}\n")
    if "nan" in time_ms.lower():        # read as text: missing values are not taken as NaN
        _one_line(lambda: load(path), "time_ms must hold numbers")
        return
    message = _one_line(lambda: load(path), "not a positive finite time")
    assert message.startswith(f"{path}: ") and "(row 1)" in message


def test_bad_times_in_frames():
    for bad in (float("nan"), float("inf"), 1e300, -2.0, 0.0):
        rows = _rows(("kqv", "fake", 128, 0, 100, 1.0), ("kqv", "fake", 256, 0, 100, bad))
        _one_line(lambda rows=rows: ProfileTable(rows, fake_meta()), "not a positive finite time")


@pytest.mark.parametrize("row,match", [
    (("kqv", "fake", 128.5, 0, 100, 1.0), "column num_tokens must hold integers (has float64)"),
    (("kqv", "fake", True, 0, 100, 1.0), "column num_tokens must hold integers"),
    (("kqv", "fake", 128, -1, 100, 1.0), "column context has -1 outside 0..4194304"),
    (("kqv", "fake", 0, 0, 100, 1.0), "column num_tokens has 0 outside 1..4194304"),
    (("kqv", "fake", 128, 0, 101, 1.0), "column sm_count has 101 outside 1..100"),
    (("kqv", "fake", 128, 0, 100, "1.0"), "time_ms must hold numbers"),
    (("kqv", "fake", 128, 0, 100, True), "time_ms must hold numbers"),
    (("kqv", 7, 128, 0, 100, 1.0), "column impl must hold text"),
    (("", "fake", 128, 0, 100, 1.0), "column op has a bad name"),
    (("k\nqv", "fake", 128, 0, 100, 1.0), "column op has a bad name"),
])
def test_bad_rows(row, match):
    _one_line(lambda: ProfileTable(_rows(row), fake_meta()), match)


def test_empty_table_and_unknown_columns():
    _one_line(lambda: ProfileTable(_rows(), fake_meta()), "no rows")
    extra = _rows(("kqv", "fake", 128, 0, 100, 1.0)).assign(note="x")
    _one_line(lambda: ProfileTable(extra, fake_meta()), "unknown column(s) note")


def test_duplicate_rows_with_different_times_are_an_error(tmp_path):
    rows = _rows(("kqv", "fake", 128, 0, 100, 1.0), ("d", "fake", 128, 0, 100, 3.0), ("kqv", "fake", 128, 0, 100, 2.0))
    _one_line(lambda: ProfileTable(rows, fake_meta()),
              "rows with one key and different times: kqv/fake 128 tokens, context 0, 100 SMs")
    # the same key beside different classes is not a clash; an exact repeat is dropped
    ok = _rows(("kqv", "fake", 128, 0, 100, 1.0, ""), ("kqv", "fake", 128, 0, 100, 1.5, "memory"),
               ("kqv", "fake", 128, 0, 100, 1.0, ""), co_class=True)
    table = ProfileTable(ok, fake_meta())
    assert len(table.rows) == 2 and table.time_ms("kqv", 128, 100) == (1.0, "fake")
    clash = _rows(("kqv", "fake", 128, 0, 100, 1.5, "memory"), ("kqv", "fake", 128, 0, 100, 1.7, "memory"),
                  co_class=True)
    _one_line(lambda: ProfileTable(clash, fake_meta()), "beside memory")
    path = tmp_path / "dup.csv"
    path.write_text(CSV_MARK + json.dumps(fake_meta()) + "\nop,impl,num_tokens,context,sm_count,time_ms\n"
                    "kqv,fake,128,0,100,1.0\nkqv,fake,128,0,100,1.25\n")
    assert _one_line(lambda: load(path), "different times").startswith(f"{path}: ")


@pytest.mark.parametrize("first_line,match", [
    (CSV_MARK + '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper"),
    (CSV_MARK + '{"num_sms": ' + "9" * 5000 + "}", "bad value"),
    (CSV_MARK + '{"gpu_name": "x\\ud800"}', "not valid unicode"),
    (CSV_MARK + json.dumps({**fake_meta(), "num_sms": 1e300}), "num_sms should be a valid integer"),
    (CSV_MARK + '{"num_sms": NaN}', "NaN is not a JSON number"),
])
def test_bad_metadata_text(tmp_path, first_line, match):
    path = tmp_path / "p.csv"
    path.write_text(first_line + "\nop,impl,num_tokens,context,sm_count,time_ms\nkqv,fake,128,0,100,1.0\n")
    _one_line(lambda: load(path), match)


def test_bad_files(tmp_path):
    (tmp_path / "bin.csv").write_bytes(bytes(range(256)) * 8)
    _one_line(lambda: load(tmp_path / "bin.csv"), "not UTF-8")
    (tmp_path / "dir.csv").mkdir()
    _one_line(lambda: load(tmp_path / "dir.csv"), "no such profile file")
    (tmp_path / "empty.parquet").write_bytes(b"")
    _one_line(lambda: load(tmp_path / "empty.parquet"), "not a readable profile table")
    with open(tmp_path / "big.csv", "wb") as f:
        f.truncate(65 * 2**20)
    _one_line(lambda: load(tmp_path / "big.csv"), "larger than 64 MiB")


def test_parquet_with_bad_columns_and_meta(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    frame = _rows(("kqv", "fake", 128, 0, 100, 1.0)).assign(num_tokens=["many"])
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({b"nfsearch-profile": json.dumps(fake_meta()).encode()}),
                   tmp_path / "cols.parquet")
    _one_line(lambda: load(tmp_path / "cols.parquet"), "column num_tokens must hold integers")
    good = pa.Table.from_pandas(_rows(("kqv", "fake", 128, 0, 100, 1.0)), preserve_index=False)
    pq.write_table(good.replace_schema_metadata({b"nfsearch-profile": b"\xff\xfe"}), tmp_path / "m.parquet")
    _one_line(lambda: load(tmp_path / "m.parquet"), "metadata is not UTF-8")
    pq.write_table(good.replace_schema_metadata({b"nfsearch-profile": b'{"gpu_name": "G"}'}), tmp_path / "k.parquet")
    _one_line(lambda: load(tmp_path / "k.parquet"), "metadata lacks num_sms, sm_granularity, source")


def test_gpu_from_profile_reads_the_checked_meta():
    gpu = gpu_from_profile(fake_profile())
    assert (gpu.name, gpu.num_sms, gpu.sm_granularity, gpu.peak_tflops, gpu.key) == \
        ("Fake GPU", 100, 2, 100.0, "h100-sxm")
    assert gpu.figures_source == "fake"
    table = ProfileTable(fake_profile().rows, fake_meta(gpu_key="tpu-v9"))
    _one_line(lambda: gpu_from_profile(table), "unknown GPU 'tpu-v9'")
    h200 = ProfileTable(fake_profile().rows, {k: v for k, v in fake_meta(gpu_key="h200").items()
                                              if k != "peak_tflops"})
    assert gpu_from_profile(h200).peak_tflops == load_gpu("h200").peak_tflops


def test_public_interpolation():
    grid = ProfileGrid(table_from_points(GRID).rows)
    assert grid.lookup(150, 0, 15, False, "kqv") == pytest.approx(11.25)
    assert bracket([10, 20, 40], 25, False, "x") == (20, 40, 0.25)
    with pytest.raises(ProfileMiss, match="covers 10..40"):
        bracket([10, 20, 40], 50, False, "x")
    assert bracket([10, 20, 40], 50, True, "x") == (40, 40, 0.0)


def test_solve_with_extrapolation_on_w2_does_not_crash():
    """`nfsearch solve --model llama-3-8b --workload W2 --allow-extrapolation` raised StopIteration:
    the SM count beside a 128-SM share (4) was extrapolated below the table, though no partition
    has it. Its lookup is now a miss, and the search skips that share."""
    from nfsearch.cost import default_profile, make_problem
    from nfsearch.search.durations import Durations
    from nfsearch.specs import load_model, load_workload
    model, workload = load_model("llama-3-8b"), load_workload("W2")
    problem = make_problem(model, workload, default_profile(model, workload), 2, allow_extrapolation=True)
    with pytest.raises(ProfileMiss, match="fewer SMs are never extrapolated"):
        problem.cost.solo_ms("kqv", 512, 4)
    durs = Durations(problem)
    assert durs.undominated("kqv", 512, 128) <= 128
    # beyond the token grid it does extrapolate
    assert problem.cost.solo_ms("kqv", 8192, 132) > problem.cost.solo_ms("kqv", 4096, 132)


# ---- fuzz: a mutated cell or metadata value gives a table or one NfsearchError line ----------------

ODD_CELLS = st.sampled_from(["", "abc", "nan", "inf", "-1", "0", "1e300", "1.5", "True", "9" * 400, "\u00e9",
                             '"a,b"', "x\ny", "128", "  7 ", "-0", "1e-320"])
ODD_META = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                     st.floats(), st.text(max_size=6), st.lists(st.integers(), max_size=2))


FUZZ_TABLE = fake_profile(tokens=(16, 64), sms=(10, 50, 100))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.integers(min_value=0, max_value=40), col=st.integers(min_value=0, max_value=6), cell=ODD_CELLS,
       meta_key=st.sampled_from(["gpu_name", "num_sms", "sm_granularity", "source", "gpu_key", "peak_tflops",
                                 "tp_degree", None]), meta_value=ODD_META)
def test_fuzz_profile_cells(tmp_path, row, col, cell, meta_key, meta_value):
    lines = FUZZ_TABLE.to_csv().splitlines()
    meta = dict(FUZZ_TABLE.meta)
    if meta_key:
        meta[meta_key] = meta_value
    body = [ln.split(",") for ln in lines[2:]]
    body[row % len(body)][col % len(body[0])] = cell
    path = tmp_path / "fuzz.csv"
    text = CSV_MARK + json.dumps(meta) + "\n" + lines[1] + "\n" + "\n".join(",".join(r) for r in body) + "\n"
    path.write_text(text)
    try:
        back = load(path)
    except NfsearchError as exc:
        assert "\n" not in str(exc)
        return
    assert back.rows["time_ms"].between(0, 1e5, inclusive="right").all()
    assert back.rows["sm_count"].between(1, back.info.num_sms).all()
    assert not back.rows.duplicated(["op", "impl", "num_tokens", "context", "sm_count", "co_class"]).any()
