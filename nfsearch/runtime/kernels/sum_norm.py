"""The reduction half of the copy-engine all-reduce (runtime.ce_collectives): one pass that sums the
tensor-parallel partials of a row slice and applies the following RMSNorm.

    sum  = p_0 + p_1 + ... + p_{N-1} (+ residual)      fp32 accumulation in rank order, stored bf16
    norm = rmsnorm(sum) * weight                       computed from the stored (rounded) sum

The partials are summed in rank order on every rank, so all ranks store bitwise the same sum (as an
all-reduce must: the next layer's shards would drift apart otherwise). The norm reads the rounded sum,
exactly what a separate RMSNorm kernel after an all-reduce would read, so fusing changes no bits of
the norm against "sum, then norm" done this way.

This rank's partial stays where its GEMM wrote it (`local`); the others arrive in a receive buffer
`recv[N, rows, H]` whose slot r holds rank r's rows (slot `rank` unused: the local partial is read in
place, no copy into the slot). `sum_out` may alias `local` (an in-place all-reduce): each program
reads a row whole before it writes it.

``sum_rmsnorm`` is the Triton kernel (a persistent grid of num_sms * PROGRAMS_PER_SM programs over
rows, like small_ops.rmsnorm); ``sum_rmsnorm_torch`` is the same math in torch for the CPU and the
reference.
"""

from __future__ import annotations

from ._common import HAVE_TRITON, next_pow2, programs, require_triton, tl, torch, triton

PROGRAMS_PER_SM = 4

if HAVE_TRITON:

    @triton.jit
    def _sum_rmsnorm_kernel(x_ptr, recv_ptr, res_ptr, w_ptr, sum_ptr, norm_ptr, T, H, s_x, s_slot, s_recv,
                            s_res, s_sum, s_norm, eps, NP, BH: tl.constexpr, N: tl.constexpr, RANK: tl.constexpr,
                            HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr):
        pid = tl.program_id(0)
        offs = tl.arange(0, BH)
        hm = offs < H
        # loaded even without the norm (w_ptr then points at any H elements): no name bound in a branch
        w = tl.load(w_ptr + offs, mask=hm, other=0.0).to(tl.float32)
        for t in range(pid, T, NP):
            t64 = t + tl.zeros([], dtype=tl.int64)
            acc = tl.zeros([BH], dtype=tl.float32)
            # rank order on every rank: the same bits everywhere (RANK is a compile-time constant)
            for r in tl.static_range(N):
                if r == RANK:
                    acc += tl.load(x_ptr + t64 * s_x + offs, mask=hm, other=0.0).to(tl.float32)
                else:
                    acc += tl.load(recv_ptr + r * s_slot + t64 * s_recv + offs, mask=hm, other=0.0).to(tl.float32)
            if HAS_RES:
                acc += tl.load(res_ptr + t64 * s_res + offs, mask=hm, other=0.0).to(tl.float32)
            h = acc.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + t64 * s_sum + offs, h, mask=hm)
            if HAS_NORM:
                hf = h.to(tl.float32)
                rstd = tl.rsqrt(tl.sum(hf * hf, 0) / H + eps)
                tl.store(norm_ptr + t64 * s_norm + offs, (hf * rstd * w).to(norm_ptr.dtype.element_ty), mask=hm)


def _check(local, recv, rank, sum_out, norm_out, weight, residual):
    T, H = local.shape
    if recv.dim() != 3 or recv.shape[1] < T or recv.shape[2] != H:
        raise ValueError(f"recv must be [N, >= {T}, {H}], not {tuple(recv.shape)}")
    if not 0 <= rank < recv.shape[0]:
        raise ValueError(f"rank {rank} outside the {recv.shape[0]} slots of recv")
    for name, t in (("local", local), ("sum_out", sum_out), ("norm_out", norm_out), ("residual", residual)):
        if t is not None and (tuple(t.shape) != (T, H) or t.stride(1) != 1):
            raise ValueError(f"{name} must be [{T}, {H}] with unit stride in H, not {tuple(t.shape)}")
    if recv.stride(2) != 1:
        raise ValueError("recv must have unit stride in H")
    if norm_out is not None and weight is None:
        raise ValueError("norm_out needs the norm's weight")


def sum_rmsnorm(local, recv, rank: int, sum_out, norm_out=None, weight=None, num_sms: int = 132,
                eps: float = 1e-5, residual=None, programs_per_sm=None):
    """sum_out = sum over ranks of the partials (+ residual); norm_out = rmsnorm(sum_out) * weight.

    local: this rank's partial [T, H]; recv: [N, >= T, H], slot r = rank r's rows 0..T-1 of the slice;
    norm_out None: the sum only (an all-reduce without the norm). Returns sum_out."""
    require_triton("sum_rmsnorm")
    _check(local, recv, rank, sum_out, norm_out, weight, residual)
    T, H = local.shape
    if T == 0:
        return sum_out
    grid = programs(num_sms, programs_per_sm or PROGRAMS_PER_SM, T)
    res = residual if residual is not None else local
    nrm = norm_out if norm_out is not None else sum_out
    w = weight if weight is not None else local
    _sum_rmsnorm_kernel[(grid,)](local, recv, res, w, sum_out, nrm, T, H, local.stride(0), recv.stride(0),
                                 recv.stride(1), res.stride(0), sum_out.stride(0), nrm.stride(0), eps, grid,
                                 BH=next_pow2(H), N=recv.shape[0], RANK=int(rank), HAS_RES=residual is not None,
                                 HAS_NORM=norm_out is not None, num_warps=8 if H >= 2048 else 4)
    return sum_out


def sum_rmsnorm_torch(local, recv, rank: int, sum_out, norm_out=None, weight=None, num_sms: int = 0,
                      eps: float = 1e-5, residual=None):
    """The same math as sum_rmsnorm in torch (CPU or GPU; num_sms ignored). Returns sum_out."""
    _check(local, recv, rank, sum_out, norm_out, weight, residual)
    T = local.shape[0]
    acc = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
    for r in range(recv.shape[0]):
        acc += (local if r == rank else recv[r, :T]).float()
    if residual is not None:
        acc += residual.float()
    h = acc.to(sum_out.dtype)
    sum_out.copy_(h)
    if norm_out is not None:
        hf = h.float()
        rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
        norm_out.copy_((hf * rstd * weight.float()).to(norm_out.dtype))
    return sum_out
