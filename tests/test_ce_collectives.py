"""The copy-engine all-reduce fused with RMSNorm (runtime/ce_collectives.py, kernels/sum_norm.py).

CPU: the fused math against a plain fp32 sum + torch's RMSNorm; two gloo processes running
CeAllReduce (and Collectives' "ce" route) over row slices against dist.all_reduce + RMSNorm.
GPU (marked gpu): the Triton kernel against the torch math; on >= 2 GPUs, the copy-engine path
against NCCL (symmetric memory, copy engines, stream memory operations)."""

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F

from nfsearch.runtime.kernels.sum_norm import sum_rmsnorm_torch


def _parts(n, rows, hidden, seed=0, dtype=torch.bfloat16, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((rows, hidden), generator=gen).to(dtype).to(device) for _ in range(n)]


def _recv_for(parts, rank):
    """The receive buffer rank `rank` holds: every other rank's rows in its slot, garbage in its own."""
    recv = torch.stack(parts).clone()
    recv[rank].fill_(1e4)               # the local slot must never be read
    return recv


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_sum_norm_matches_sum_then_rmsnorm(n, with_residual):
    rows, hidden, eps = 5, 64, 1e-5
    parts = _parts(n, rows, hidden)
    weight = (1.0 + 0.1 * torch.randn(hidden)).bfloat16()
    residual = torch.randn(rows, hidden).bfloat16() if with_residual else None
    want = sum(p.float() for p in parts) + (residual.float() if with_residual else 0.0)
    want_sum = want.bfloat16()
    want_norm = F.rms_norm(want_sum.float(), (hidden,), weight.float(), eps).bfloat16()
    got_sum, got_norm = torch.empty(rows, hidden).bfloat16(), torch.empty(rows, hidden).bfloat16()
    sum_rmsnorm_torch(parts[1], _recv_for(parts, 1), 1, got_sum, got_norm, weight, eps=eps, residual=residual)
    assert torch.equal(got_sum, want_sum)
    assert torch.allclose(got_norm.float(), want_norm.float(), rtol=1e-2, atol=1e-2)
    # the norm reads the rounded sum: exactly rmsnorm of what was stored
    assert torch.equal(got_norm, F.rms_norm(got_sum.float(), (hidden,), weight.float(), eps).bfloat16())


def test_fused_sum_is_the_same_bits_whichever_rank_computes_it():
    n, rows, hidden = 4, 7, 96
    parts = _parts(n, rows, hidden, seed=3)
    outs = []
    for rank in range(n):
        out = torch.empty(rows, hidden).bfloat16()
        sum_rmsnorm_torch(parts[rank], _recv_for(parts, rank), rank, out)
        outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_fused_sum_in_place_and_on_a_row_slice():
    n, rows, hidden = 2, 8, 32
    parts = _parts(n, rows, hidden, seed=5)
    want = (parts[0].float() + parts[1].float()).bfloat16()
    local = parts[0].clone()
    recv = _recv_for(parts, 0)
    sum_rmsnorm_torch(local[2:6], recv[:, 2:6], 0, local[2:6])     # in place, rows 2..5 only
    assert torch.equal(local[2:6], want[2:6])
    assert torch.equal(local[:2], parts[0][:2]) and torch.equal(local[6:], parts[0][6:])


def test_fused_sum_rejects_bad_shapes():
    parts = _parts(2, 4, 16)
    out = torch.empty(4, 16).bfloat16()
    with pytest.raises(ValueError, match="recv must be"):
        sum_rmsnorm_torch(parts[0], torch.stack(parts)[:, :2], 0, out)
    with pytest.raises(ValueError, match="rank 2 outside"):
        sum_rmsnorm_torch(parts[0], torch.stack(parts), 2, out)
    with pytest.raises(ValueError, match="norm_out needs"):
        sum_rmsnorm_torch(parts[0], torch.stack(parts), 0, out, norm_out=torch.empty(4, 16).bfloat16())


# ---------------------------------------------------------------------------------------------- gloo
def _gloo_worker(tp, out_path):
    import torch.distributed as dist

    from nfsearch.runtime import ce_collectives as ce_mod
    from nfsearch.runtime.collectives import Collectives

    rows, hidden = 24, 64
    ce = ce_mod.CeAllReduce(None, rows, hidden, torch.bfloat16, tp.device, num_slots=3)
    report = {"direct": ce_mod.check_against_all_reduce(ce, [(0, 8), (8, 20), (20, 20)], seed=1)}
    # Collectives' "ce" route: two ops, two row ranges each, sum in place then the norm
    coll = Collectives()
    coll.prepare_ce({"allreduce_o": [(0, 12), (12, 24)], "allreduce_d": [(0, 24)]}, rows, hidden, torch.bfloat16,
                    tp.device)
    gen = torch.Generator().manual_seed(10 + tp.rank)
    buf = torch.randn((rows, hidden), generator=gen).bfloat16()
    want = buf.float()
    dist.all_reduce(want)
    weight = torch.ones(hidden).bfloat16()
    normed = torch.empty_like(buf)
    coll.all_reduce_rows_ce("allreduce_o", buf, 12, 24, norm_out=normed[12:24], weight=weight)
    coll.all_reduce_rows_ce("allreduce_o", buf, 0, 12)
    report["route_sum_err"] = float((buf.float() - want).abs().max() / want.abs().max())
    report["route_norm_err"] = float((normed[12:24].float() - F.rms_norm(buf[12:24].float(), (hidden,))).abs().max())
    try:
        coll.all_reduce_rows_ce("allreduce_d", buf, 0, 12)
        report["unprepared_rows_refused"] = False
    except RuntimeError:
        report["unprepared_rows_refused"] = True
    with open(f"{out_path}.{tp.rank}", "w") as f:
        json.dump(report, f)


def test_gloo_ce_all_reduce_matches_dist_all_reduce(tmp_path):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from nfsearch.runtime import tp as tp_mod
    out = str(tmp_path / "ce.json")
    tp_mod.spawn_ranks(_gloo_worker, 2, "gloo", (out,))
    for rank in range(2):
        r = json.loads(Path(f"{out}.{rank}").read_text())
        d = r["direct"]
        assert d["sync"] == "gloo" and d["world_size"] == 2
        assert d["rel_error_sum"] < 5e-3 and d["rel_error_norm"] < 1e-2
        assert d["is_same_on_all_ranks"] and d["untouched_rows_kept"]
        assert r["route_sum_err"] < 1e-2 and r["route_norm_err"] < 5e-2
        assert r["unprepared_rows_refused"]


def test_ce_refuses_rows_and_slots_it_was_not_made_for(tmp_path):
    import torch.distributed as dist

    from nfsearch.runtime.ce_collectives import CeAllReduce
    if not dist.is_gloo_available():
        pytest.skip("gloo not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ce = CeAllReduce(None, 8, 16, torch.bfloat16, "cpu")
        x = torch.zeros(4, 16).bfloat16()
        with pytest.raises(ValueError, match="outside the 8 rows"):
            ce.all_reduce_norm(x, 6, 10)
        with pytest.raises(ValueError, match="slot 1 outside"):
            ce.all_reduce_norm(x, 0, 4, slot=1)
        with pytest.raises(ValueError, match="contiguous"):
            ce.all_reduce_norm(x[:2], 0, 4)
        with pytest.raises(ValueError, match="sync must be"):
            CeAllReduce(None, 8, 16, torch.bfloat16, "cpu", sync="nvls")
        # a group of one: the sum is the partial itself
        y = torch.randn(4, 16).bfloat16()
        assert torch.equal(ce.all_reduce_norm(y.clone(), 0, 4), y)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("n", [2, 4])
def test_gpu_triton_sum_norm_matches_torch_math(n):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    from nfsearch.runtime.kernels.sum_norm import sum_rmsnorm
    rows, hidden = 300, 8192
    parts = _parts(n, rows, hidden, seed=7, device="cuda")
    weight = (1.0 + 0.1 * torch.randn(hidden, device="cuda")).bfloat16()
    rank = n - 1
    recv = _recv_for(parts, rank)
    want_sum, want_norm = torch.empty_like(parts[0]), torch.empty_like(parts[0])
    sum_rmsnorm_torch(parts[rank], recv, rank, want_sum, want_norm, weight)
    got_sum, got_norm = torch.empty_like(parts[0]), torch.empty_like(parts[0])
    sum_rmsnorm(parts[rank], recv, rank, got_sum, got_norm, weight, num_sms=16)
    assert torch.equal(got_sum, want_sum)
    assert torch.allclose(got_norm.float(), want_norm.float(), rtol=1e-2, atol=1e-2)


def _nccl_worker(tp, out_path):
    from nfsearch.runtime.ce_collectives import CeAllReduce, check_against_all_reduce
    ce = CeAllReduce(None, 1024, 8192, torch.bfloat16, tp.device, num_slots=2)
    r = check_against_all_reduce(ce, [(0, 512), (512, 1000)], seed=2)
    if tp.rank == 0:
        with open(out_path, "w") as f:
            json.dump(r, f)


@pytest.mark.gpu
def test_gpu_ce_all_reduce_matches_nccl(tmp_path):
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    from nfsearch.runtime import tp as tp_mod
    out = str(tmp_path / "ce.json")
    tp_mod.spawn_ranks(_nccl_worker, 2, "nccl", (out,))
    r = json.loads(Path(out).read_text())
    assert r["rel_error_sum"] < 5e-3 and r["rel_error_norm"] < 1e-2
    assert r["is_same_on_all_ranks"] and r["untouched_rows_kept"]
