"""SM-bounded bf16 GEMM: ``out = a @ w (+ residual)`` with a persistent Triton grid.

The grid is ``num_sms * programs_per_sm`` programs (at most the number of output tiles); each
program walks the tiles ``pid, pid + P, pid + 2P, ...`` in grouped (L2-friendly) order, so the
kernel occupies at most that many SMs' worth of CTAs and overlaps with work on the other SMs.
"""

from __future__ import annotations

from ._common import HAVE_TRITON, programs, require_triton, tl, triton

# (BM, BN, BK, GROUP_M, num_warps, num_stages, programs_per_sm), chosen by M bucket.
# Large tiles for large M (compute-bound); smaller tiles for small M so that enough tiles exist
# to spread over the SMs (small-M GEMMs are weight-bandwidth bound).
# Picked from a `benchmarks/kernel_bench.py --sweep` run (H100, 132 SMs).
CONFIGS = {
    "small": (64, 128, 64, 8, 4, 4, 1),    # M <= 256
    "medium": (128, 128, 64, 8, 8, 4, 1),  # M <= 1024, N < 6144
    "wide": (128, 256, 64, 8, 8, 4, 1),    # M <= 1024 with N >= 6144, and all M > 1024
}


def pick_config(M: int, N: int, K: int):
    if M <= 256:
        return CONFIGS["small"]
    if M <= 1024 and N < 6144:
        return CONFIGS["medium"]
    return CONFIGS["wide"]


if HAVE_TRITON:

    @triton.jit
    def _gemm_kernel(a_ptr, w_ptr, c_ptr, r_ptr, M, N, K,
                     s_am, s_ak, s_wk, s_wn, s_cm, s_cn, s_rm, s_rn, NP,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                     HAS_RES: tl.constexpr, STAGES: tl.constexpr, EVEN_K: tl.constexpr):
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BM)
        num_pid_n = tl.cdiv(N, BN)
        num_tiles = num_pid_m * num_pid_n
        k_tiles = tl.cdiv(K, BK)
        rk = tl.arange(0, BK)
        for tile in range(pid, num_tiles, NP):
            group = tile // (GROUP_M * num_pid_n)
            first_m = group * GROUP_M
            gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
            pm = first_m + (tile % gsize)
            pn = (tile % (GROUP_M * num_pid_n)) // gsize
            rm = pm * BM + tl.arange(0, BM)
            rn = pn * BN + tl.arange(0, BN)
            # No tl.where clamping of the offsets: it hides their contiguity from Triton and turns
            # the tile loads into narrow loads (suspected cause of a 16x slowdown seen on H100); masks keep vectors.
            mmask = rm < M
            nmask = rn < N
            a_ptrs = a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak
            w_ptrs = w_ptr + rk[:, None] * s_wk + rn[None, :] * s_wn
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for kt in tl.range(0, k_tiles, num_stages=STAGES):
                if EVEN_K:
                    x = tl.load(a_ptrs, mask=mmask[:, None], other=0.0)
                    y = tl.load(w_ptrs, mask=nmask[None, :], other=0.0)
                else:
                    kmask = (kt * BK + rk) < K
                    x = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
                    y = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
                acc = tl.dot(x, y, acc)
                a_ptrs += BK * s_ak
                w_ptrs += BK * s_wk
            cmask = (rm[:, None] < M) & (rn[None, :] < N)
            if HAS_RES:
                res = tl.load(r_ptr + rm[:, None] * s_rm + rn[None, :] * s_rn, mask=cmask, other=0.0)
                acc += res.to(tl.float32)
            tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=cmask)


def gemm(a, w, out, num_sms: int, residual=None, config=None):
    """out[M,N] = a[M,K] @ w[K,N] (+ residual[M,N]) on a persistent grid bounded by ``num_sms``.

    ``config`` overrides the table: (BM, BN, BK, GROUP_M, num_warps, num_stages, programs_per_sm).
    Returns ``out``.
    """
    require_triton("gemm")
    M, K = a.shape
    K2, N = w.shape
    assert K == K2 and tuple(out.shape) == (M, N), (a.shape, w.shape, out.shape)
    if residual is not None:
        assert tuple(residual.shape) == (M, N)
    BM, BN, BK, GM, warps, stages, pps = config or pick_config(M, N, K)
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    grid = programs(num_sms, pps, tiles)
    r = residual if residual is not None else out
    _gemm_kernel[(grid,)](a, w, out, r, M, N, K,
                          a.stride(0), a.stride(1), w.stride(0), w.stride(1),
                          out.stride(0), out.stride(1), r.stride(0), r.stride(1), grid,
                          BM=BM, BN=BN, BK=BK, GROUP_M=GM, HAS_RES=residual is not None, STAGES=stages, EVEN_K=K % BK == 0,
                          num_warps=warps, num_stages=stages)
    return out
