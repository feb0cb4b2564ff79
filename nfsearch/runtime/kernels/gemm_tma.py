"""SM-bounded bf16 GEMM with TMA tensor descriptors: ``out = a @ w (+ residual)``.

Persistent grid of exactly ``NP = num_sms`` programs (one CTA per SM of the partition). The output
tiles are split in two regions:

* a data-parallel region: whole tiles, program ``p`` takes tiles ``p, p + NP, p + 2 NP, ...`` in
  grouped (L2-friendly) order, so the tiles in flight at any moment are neighbours;
* a stream-K tail (``sk`` configs) when the tile count is not a multiple of ``NP``: the last
  ``rem + NP`` tiles (or all tiles when there are fewer than ``NP``) are cut into their K iterations,
  and every program takes an equal contiguous run of those iterations. A tile finished by several
  programs is summed by the last one to arrive (fp32 partials in a workspace, one arrival counter per
  tile, reset by that last program), so every program does the same amount of MMA work and the
  partition runs whole waves whatever M, N and the SM count are. Small-M shapes (M = 512: fewer tiles
  than SMs) are all stream-K, which is split-K with exact balance.

A, W tiles come in through TMA descriptors (host ``TensorDescriptor``; the launcher encodes the
tensor maps, no device allocation); the output (and residual) tile goes out through TMA too. Partial
tiles go through plain fp32 stores/loads (.cg, L2).

Config tuple: ``(BM, BN, BK, GROUP_M, num_warps, num_stages, stream_k, flatten)``; ``flatten`` is
ignored now (tl.range(flatten=True) on the tile loop did not help in the first H100 sweep).
"""

from __future__ import annotations

from ._common import HAVE_TRITON, require_triton, tl, torch, triton
from .gemm import gemm

try:  # pragma: no cover - depends on the triton version
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAVE_TMA = HAVE_TRITON
except Exception:  # noqa: BLE001
    TensorDescriptor = None
    HAVE_TMA = False

# Defaults by shape; benchmarks/kernel_bench.py sweeps alternatives (see docs/kernels.md).
# On an H100, data-parallel 128x256x64 / 8 warps / 3 stages reaches 0.97-0.99x cuBLAS at M >= 2048
# (UG M=4096: 0.90-0.95). The stream-K region runs 2-2.5x slower per K step than the data-parallel
# loop (written as a while loop or as a for loop alike; cause not found), so no default uses it;
# small M takes 128x128 tiles. The table comes from one sweep of the shapes, not re-timed as a whole.
BIG = (128, 256, 64, 8, 8, 3, False, False)
BIG_SK = (128, 256, 64, 8, 8, 3, True, False)
MID = (128, 128, 64, 8, 8, 4, True, False)
MID_DP = (128, 128, 64, 8, 8, 4, False, False)
CONFIGS = {"big": BIG, "big_sk": BIG_SK, "mid": MID, "mid_dp": MID_DP}


def pick_config(M: int, N: int, K: int, num_sms: int):
    """The config table: data-parallel 128x256 tiles where there are at least half a wave of them
    (KQV M=512: 96 tiles, 0.80x cuBLAS vs 0.68 with 128x128), data-parallel 128x128 below that
    (O/D M=512: 64 tiles, 0.70/0.81 vs 0.58)."""
    tiles_big = -(-M // BIG[0]) * -(-N // BIG[1])
    if 2 * tiles_big >= num_sms:
        return BIG
    return MID_DP


if HAVE_TRITON:

    @triton.jit
    def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        width = GROUP_M * num_pid_n
        group = tile // width
        first_m = group * GROUP_M
        gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
        pm = first_m + (tile % width) % gsize
        pn = (tile % width) // gsize
        return pm, pn

    @triton.jit
    def _epilogue(acc, c_desc, r_desc, om, on, HAS_RES: tl.constexpr):
        if HAS_RES:
            acc += r_desc.load([om, on]).to(tl.float32)
        c_desc.store([om, on], acc.to(c_desc.dtype))

    @triton.jit
    def _gemm_tma_kernel(a_desc, b_desc, c_desc, r_desc, ws_ptr, cnt_ptr, M, N, K,
                         NP, DP_TILES, SK_TILES, IPP, NSEG,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                         HAS_RES: tl.constexpr, STAGES: tl.constexpr):
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BM)
        num_pid_n = tl.cdiv(N, BN)
        kt = tl.cdiv(K, BK)
        # ---- data-parallel region: whole tiles, strided over the programs
        for tile in range(pid, DP_TILES, NP):
            pm, pn = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            om = pm * BM
            on = pn * BN
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for ki in tl.range(0, kt, num_stages=STAGES):
                a = a_desc.load([om, ki * BK])
                b = b_desc.load([ki * BK, on])
                acc = tl.dot(a, b, acc)
            _epilogue(acc, c_desc, r_desc, om, on, HAS_RES)
        # ---- stream-K region: equal contiguous runs of (tile, k-iteration) per program
        if SK_TILES > 0:
            total = SK_TILES * kt
            it = pid * IPP
            end = tl.minimum(it + IPP, total)
            first_lt = it // kt
            rm = tl.arange(0, BM)
            rn = tl.arange(0, BN)
            tile_off = rm[:, None] * BN + rn[None, :]
            for _seg in range(0, NSEG):  # a for loop (not while): Triton pipelines the K loop inside it
                if it < end:
                    lt = it // kt
                    k0 = it - lt * kt
                    k1 = tl.minimum(kt, k0 + (end - it))
                    pm, pn = _tile_coords(DP_TILES + lt, num_pid_m, num_pid_n, GROUP_M)
                    om = pm * BM
                    on = pn * BN
                    acc = tl.zeros((BM, BN), dtype=tl.float32)
                    for ki in tl.range(k0, k1, num_stages=STAGES):
                        a = a_desc.load([om, ki * BK])
                        b = b_desc.load([ki * BK, on])
                        acc = tl.dot(a, b, acc)
                    if (k0 == 0) & (k1 == kt):
                        _epilogue(acc, c_desc, r_desc, om, on, HAS_RES)
                    else:
                        slot = pid * 2 + tl.where(lt == first_lt, 0, 1)
                        tl.store(ws_ptr + slot.to(tl.int64) * (BM * BN) + tile_off, acc, cache_modifier=".cg")
                        tl.debug_barrier()
                        prev = tl.atomic_add(cnt_ptr + lt, k1 - k0, sem="acq_rel", scope="gpu")
                        tl.debug_barrier()
                        if prev + (k1 - k0) == kt:  # last to arrive: add the other programs' partials
                            q_lo = (lt * kt) // IPP
                            q_hi = ((lt + 1) * kt - 1) // IPP
                            for q in range(q_lo, q_hi + 1):
                                if q != pid:
                                    qslot = q * 2 + tl.where(lt == (q * IPP) // kt, 0, 1)
                                    acc += tl.load(ws_ptr + qslot.to(tl.int64) * (BM * BN) + tile_off,
                                                   cache_modifier=".cg")
                            tl.atomic_xchg(cnt_ptr + lt, 0)  # ready for the next launch
                            _epilogue(acc, c_desc, r_desc, om, on, HAS_RES)
                    it = lt * kt + k1


_WS: dict = {}


def _workspace(device, stream_id, n_ws: int, n_cnt: int):
    """fp32 partial-tile workspace and zeroed int32 arrival counters, per (device, stream): two GEMMs
    on different streams must not share them; counters are left at zero by every launch."""
    key = (str(device), stream_id)
    ws, cnt = _WS.get(key, (None, None))
    if ws is None or ws.numel() < n_ws:
        ws = torch.empty(max(n_ws, 1), device=device, dtype=torch.float32)
    if cnt is None or cnt.numel() < n_cnt:
        cnt = torch.zeros(max(n_cnt, 1024), device=device, dtype=torch.int32)
    _WS[key] = (ws, cnt)
    return ws, cnt


def plan_split(M: int, N: int, K: int, num_sms: int, config):
    """(NP, dp_tiles, sk_tiles, iters_per_program) for a launch."""
    BM, BN, BK = config[0], config[1], config[2]
    sk = config[6]
    tiles = -(-M // BM) * -(-N // BN)
    kt = -(-K // BK)
    if not sk:
        return max(1, min(num_sms, tiles)), tiles, 0, 0
    NP = max(1, int(num_sms))
    rem = tiles % NP
    if rem == 0:
        return NP, tiles, 0, 0
    full = tiles // NP
    sk_tiles = rem + NP if full >= 1 else tiles
    ipp = -(-sk_tiles * kt // NP)
    return NP, tiles - sk_tiles, sk_tiles, ipp


def tma_ok(a, w, out, residual=None) -> bool:
    """TMA needs unit inner stride, 16-byte aligned base addresses and row strides."""
    for t in (a, w, out) + ((residual,) if residual is not None else ()):
        if t.stride(1) != 1 or (t.data_ptr() % 16) or (t.stride(0) * t.element_size()) % 16:
            return False
    return True


def gemm_tma(a, w, out, num_sms: int, residual=None, config=None):
    """out[M,N] = a[M,K] @ w[K,N] (+ residual) on exactly ``num_sms`` persistent programs (TMA loads,
    stream-K tail). Falls back to the pointer-based kernel when TMA cannot take the tensors."""
    require_triton("gemm_tma")
    M, K = a.shape
    K2, N = w.shape
    assert K == K2 and tuple(out.shape) == (M, N), (a.shape, w.shape, out.shape)
    if not HAVE_TMA or not tma_ok(a, w, out, residual):
        return gemm(a, w, out, num_sms, residual=residual)
    cfg = config or pick_config(M, N, K, num_sms)
    BM, BN, BK, GM, warps, stages = cfg[:6]
    NP, dp_tiles, sk_tiles, ipp = plan_split(M, N, K, num_sms, cfg)
    ws, cnt = _workspace(a.device, torch.cuda.current_stream(a.device).cuda_stream,
                         NP * 2 * BM * BN if sk_tiles else 1, sk_tiles)
    a_d = TensorDescriptor.from_tensor(a, [BM, BK])
    b_d = TensorDescriptor.from_tensor(w, [BK, BN])
    c_d = TensorDescriptor.from_tensor(out, [BM, BN])
    r_d = TensorDescriptor.from_tensor(residual, [BM, BN]) if residual is not None else c_d
    _gemm_tma_kernel[(NP,)](a_d, b_d, c_d, r_d, ws, cnt, M, N, K, NP, dp_tiles, sk_tiles, max(ipp, 1),
                            -(-max(ipp, 1) // -(-K // BK)) + 1,
                            BM=BM, BN=BN, BK=BK, GROUP_M=GM, HAS_RES=residual is not None, STAGES=stages,
                            num_warps=warps, num_stages=stages)
    return out

