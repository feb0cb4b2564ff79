"""Profile tables: CSV/Parquet round trips, bilinear interpolation, misses, extrapolation, bad files.

All timings here are fake (meta source "fake")."""

import json

import pandas as pd
import pytest

from conftest import TINY_MODEL, TINY_WL, fake_meta, fake_profile, table_from_points
from nfsearch.roofline import analytic_profile
from nfsearch.errors import NfsearchError
from nfsearch.profile import CSV_MARK, ProfileMiss, ProfileTable, load
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
    # below the SM grid: as 1/SMs from the edge (100 tokens at 5 SMs: 10 * 2)
    assert table.time_ms("kqv", 100, 5, allow_extrapolation=True)[0] == pytest.approx(20.0)
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
    ([1, 2, 3], "metadata"),
    (7, "not a readable"),
])
def test_bad_metadata(tmp_path, meta, match):
    _write_csv(tmp_path / "p.csv", meta, _frame())
    with pytest.raises(NfsearchError, match=match):
        load(tmp_path / "p.csv")


@pytest.mark.parametrize("content,match", [
    ("op,impl,num_tokens,context,sm_count,time_ms\nkqv,fake,128,0,100,1.0\n", "metadata line"),
    (CSV_MARK + "{not json\nop\n", "not a readable"),
    (CSV_MARK + json.dumps(fake_meta()) + "\nop,impl,num_tokens,context,sm_count,time_ms\n"
     "kqv,fake,many,0,100,1.0\n", "not a readable"),
    (CSV_MARK + json.dumps(fake_meta()) + "\nop,impl,num_tokens,context,sm_count,time_ms\n"
     "kqv,fake,128,0,100,-1.0\n", "non-positive"),
    (CSV_MARK + json.dumps(fake_meta()) + "\nop,impl,num_tokens,context,sm_count,time_ms\n"
     "kqv,fake,128,0,100,\n", "not a readable|missing"),
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
