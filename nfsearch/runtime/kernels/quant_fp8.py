"""Per-token e4m3 quantization fused into the op that makes the activation, for the FP8 GEMMs.

The "fp8" GEMM (gemm_fp8) needs its activation as e4m3 rows with one float32 scale per row. Done
after the fact (runtime.fp8.quantize_rows) that is a handful of torch kernels and two more HBM passes
over the activation per GEMM; here each producer writes e4m3 + scale directly, one pass per row:

* ``rmsnorm_quant``: h = x (+ residual) -> rmsnorm(h) * weight -> (q [T, H], scale [T, 1]); h can be
  written back (``residual_out``), so the residual add of the GEMM before runs here too;
* ``silu_mul_quant``: [T, 2I] -> silu(gate) * up -> (q [T, I], scale [T, 1]);
* ``quantize_rows_into``: any [T, K] activation (the attention output before the O GEMM).

Numerics: each kernel rounds the activation to the input's dtype first (the bf16 tensor the unfused
path would have written), then quantizes it exactly as runtime.fp8.quantize_rows does: scale =
max(amax, MIN_AMAX) / 448, q = saturate(y / scale) rounded to nearest-even e4m3, divisions IEEE-rounded
(tl.math.div_rn). So a kernel writes the bytes of its ``*_torch`` reference, except where the
activation itself differs by an ulp (reduction order in the norm, exp in SiLU) and the rounding of
that ulp lands on the other side of a tie. The residual sum h is rounded to x's dtype before the norm,
like the bf16 tensor the unfused GEMM + add writes.

Grids: persistent, ``num_sms * PROGRAMS_PER_SM`` programs striding over rows (small_ops'
convention); one program holds a whole row when it fits ``MAX_ONE_PASS`` elements, else (SiLU of a
wide FFN, a wide activation) it reads the row twice in chunks: once for the amax, once to quantize
(the second read mostly hits L2). Shapes alone fix the grid, so every kernel is CUDA-graph capturable.

Dispatch: the Triton kernel on a CUDA tensor (or under TRITON_INTERPRET=1, for CPU tests), the torch
reference elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._common import HAVE_TRITON, next_pow2, programs, require_triton, tl, torch, triton, use_triton

PROGRAMS_PER_SM = 4
MAX_ONE_PASS = 16384               # elements of a row one program keeps in registers
CHUNK = 8192                       # elements per chunk of a two-pass row
FP8_MAX = 448.0
MIN_AMAX = 1e-12                   # runtime.fp8.MIN_AMAX: a zero row gets a tiny scale, not 0 / 0


@dataclass(frozen=True)
class RowsConfig:
    """How the SiLU / plain row quantizer covers its rows: a row of up to ``max_one_pass`` elements in one
    program, a wider one in ``chunk``-element pieces read twice; ``num_warps`` (None: by the block's
    size) and ``programs_per_sm`` of the persistent grid. The default keeps an 8B model's 14,336-wide
    SiLU row in one 16-warp program, which fills an SM's registers, so each SM quantizes its rows one
    after another; the GPU test times the alternatives."""
    max_one_pass: int = MAX_ONE_PASS
    chunk: int = CHUNK
    num_warps: int | None = None
    programs_per_sm: int = PROGRAMS_PER_SM


ROWS_CONFIG = RowsConfig()


@dataclass
class Fp8Rows:
    """An activation already in e4m3, as gemm_fp8 takes it in place of a bf16 tensor."""
    data: object                   # [T, K] float8_e4m3fn, row-major (torch._scaled_mm's mat1)
    scale: object                  # [T, 1] float32 contiguous: row t is data[t] * scale[t]

    @property
    def shape(self):
        return self.data.shape


if HAVE_TRITON:
    from .paged_attention import _round_to_e4m3

    FP8_LIMIT = tl.constexpr(FP8_MAX)
    AMAX_FLOOR = tl.constexpr(MIN_AMAX)
    BF16_MASK = tl.constexpr(-(1 << 16))         # 0xFFFF0000 as an int32

    @triton.jit
    def _scale_of(amax):
        """max(amax, MIN_AMAX) / 448, IEEE-rounded as torch's division."""
        return tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), tl.full(amax.shape, FP8_LIMIT, tl.float32))

    @triton.jit
    def _store_q(y, scale, q_ptrs, mask):
        """saturate(y / scale) as e4m3 at q_ptrs (y fp32, scale a scalar)."""
        q = tl.clamp(tl.math.div_rn(y, tl.full(y.shape, 1.0, tl.float32) * scale), -FP8_LIMIT, FP8_LIMIT)
        q = _round_to_e4m3(q)      # by hand under the interpreter only; on a GPU the cast rounds
        tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _rounded(x, DT: tl.constexpr):
        """x (fp32) rounded to DT and widened back: the value a tensor of DT holds. bf16 rounds to
        nearest-even by integer arithmetic on the bits (Triton's interpreter truncates in its cast;
        this way the interpreter and the GPU agree); other types by their cast."""
        if DT == tl.bfloat16:
            b = x.to(tl.int32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & BF16_MASK
            return b.to(tl.float32, bitcast=True)
        else:
            return x.to(DT).to(tl.float32)

    @triton.jit
    def _rmsnorm_quant_kernel(x_ptr, w_ptr, q_ptr, s_ptr, res_ptr, resout_ptr, T, H, s_x, s_q, s_r, s_ro, eps,
                              NP, BH: tl.constexpr, HAS_RES: tl.constexpr, HAS_RESOUT: tl.constexpr):
        pid = tl.program_id(0)
        offs = tl.arange(0, BH)
        hm = offs < H
        w = tl.load(w_ptr + offs, mask=hm, other=0.0).to(tl.float32)
        for t in range(pid, T, NP):
            t64 = t + tl.zeros([], dtype=tl.int64)
            h = tl.load(x_ptr + t64 * s_x + offs, mask=hm, other=0.0).to(tl.float32)
            if HAS_RES:
                h += tl.load(res_ptr + t64 * s_r + offs, mask=hm, other=0.0).to(tl.float32)
                h = _rounded(h, x_ptr.dtype.element_ty)
                if HAS_RESOUT:
                    tl.store(resout_ptr + t64 * s_ro + offs, h.to(resout_ptr.dtype.element_ty), mask=hm)
            ms = tl.sum(h * h, 0) / H + eps
            rstd = tl.math.div_rn(tl.full(ms.shape, 1.0, tl.float32), tl.math.sqrt_rn(ms))
            y = _rounded(h * rstd * w, x_ptr.dtype.element_ty)
            scale = _scale_of(tl.max(tl.abs(y), 0))
            _store_q(y, scale, q_ptr + t64 * s_q + offs, hm)
            tl.store(s_ptr + t64, scale)

    @triton.jit
    def _row_values(row_ptr, offs, mask, W, SILU: tl.constexpr):
        """The activation at offs of one row, fp32, rounded to the input's dtype: the row itself, or
        silu(row[:W]) * row[W:] (SILU)."""
        g = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            u = tl.load(row_ptr + W + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.math.div_rn(g, tl.exp(-g) + 1.0) * u
        return _rounded(g, row_ptr.dtype.element_ty)

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, T, W, s_x, s_q, NP, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                           SILU: tl.constexpr):
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        for t in range(pid, T, NP):
            t64 = t + tl.zeros([], dtype=tl.int64)
            row, qrow = x_ptr + t64 * s_x, q_ptr + t64 * s_q
            if ONE_PASS:
                m = offs < W
                y = _row_values(row, offs, m, W, SILU)
                scale = _scale_of(tl.max(tl.abs(y), 0))
                _store_q(y, scale, qrow + offs, m)
            else:
                amax = tl.zeros([], dtype=tl.float32)
                for c in range(0, W, BLOCK):
                    m = c + offs < W
                    amax = tl.maximum(amax, tl.max(tl.abs(_row_values(row, c + offs, m, W, SILU)), 0))
                scale = _scale_of(amax)
                for c in range(0, W, BLOCK):
                    m = c + offs < W
                    _store_q(_row_values(row, c + offs, m, W, SILU), scale, qrow + c + offs, m)
            tl.store(s_ptr + t64, scale)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _check_out(q_out, scale_out, T: int, W: int) -> None:
    if q_out.dtype != torch.float8_e4m3fn or tuple(q_out.shape) != (T, W) or q_out.stride(1) != 1:
        raise ValueError(f"q_out must be float8_e4m3fn [{T}, {W}] with unit column stride, not "
                         f"{q_out.dtype} {list(q_out.shape)}")
    if scale_out.dtype != torch.float32 or tuple(scale_out.shape) != (T, 1) or not scale_out.is_contiguous():
        raise ValueError(f"scale_out must be contiguous float32 [{T}, 1], not {scale_out.dtype} {list(scale_out.shape)}")


# ------------------------------------------------------------------------------------------ Triton
def rmsnorm_quant_triton(x, weight, q_out, scale_out, num_sms: int, eps: float = 1e-5, residual=None,
                         residual_out=None, programs_per_sm=None):
    """``rmsnorm_quant`` by one Triton kernel."""
    require_triton("rmsnorm_quant")
    T, H = x.shape
    _check_out(q_out, scale_out, T, H)
    assert x.stride(1) == 1 and next_pow2(H) <= 2 * MAX_ONE_PASS, "rmsnorm_quant: rows of at most 32768"
    if T == 0:
        return Fp8Rows(q_out, scale_out)
    r = residual if residual is not None else x
    ro = residual_out if residual_out is not None else x
    grid = programs(num_sms, programs_per_sm or PROGRAMS_PER_SM, T)
    _rmsnorm_quant_kernel[(grid,)](x, weight, q_out, scale_out, r, ro, T, H, x.stride(0), q_out.stride(0),
                                   r.stride(0), ro.stride(0), eps, grid, BH=next_pow2(H),
                                   HAS_RES=residual is not None, HAS_RESOUT=residual_out is not None,
                                   num_warps=_num_warps(next_pow2(H)))
    return Fp8Rows(q_out, scale_out)


def _quant_rows_launch(x, q_out, scale_out, num_sms, W: int, is_silu: bool, programs_per_sm=None,
                       config: RowsConfig | None = None):
    cfg = config or ROWS_CONFIG
    T = x.shape[0]
    _check_out(q_out, scale_out, T, W)
    assert x.stride(1) == 1
    if T == 0:
        return Fp8Rows(q_out, scale_out)
    one_pass, block, num_warps = rows_layout(W, cfg)
    grid = programs(num_sms, programs_per_sm or cfg.programs_per_sm, T)
    _quant_rows_kernel[(grid,)](x, q_out, scale_out, T, W, x.stride(0), q_out.stride(0), grid, BLOCK=block,
                                ONE_PASS=one_pass, SILU=is_silu, num_warps=num_warps)
    return Fp8Rows(q_out, scale_out)


def rows_layout(W: int, cfg: RowsConfig) -> tuple[bool, int, int]:
    """(one pass?, block elements, warps) of _quant_rows_kernel for rows of W elements under cfg."""
    one_pass = next_pow2(W) <= cfg.max_one_pass
    block = next_pow2(W) if one_pass else cfg.chunk
    return one_pass, block, cfg.num_warps or _num_warps(block)


def silu_mul_quant_triton(x, q_out, scale_out, num_sms: int, programs_per_sm=None, config: RowsConfig | None = None):
    """``silu_mul_quant`` by one Triton kernel."""
    require_triton("silu_mul_quant")
    return _quant_rows_launch(x, q_out, scale_out, num_sms, x.shape[1] // 2, True, programs_per_sm, config)


def quantize_rows_triton(x, q_out, scale_out, num_sms: int, programs_per_sm=None, config: RowsConfig | None = None):
    """``quantize_rows_into`` by one Triton kernel."""
    require_triton("quantize_rows_into")
    return _quant_rows_launch(x, q_out, scale_out, num_sms, x.shape[1], False, programs_per_sm, config)


# ------------------------------------------------------------------------------------------ torch
def _emit_q(y, q_out, scale_out):
    """runtime.fp8.quantize_rows(y) written into (q_out, scale_out)."""
    from nfsearch.runtime.fp8 import quantize_rows
    _check_out(q_out, scale_out, *y.shape)
    q, s = quantize_rows(y)
    q_out.copy_(q)
    scale_out.copy_(s)
    return Fp8Rows(q_out, scale_out)


def rmsnorm_quant_torch(x, weight, q_out, scale_out, num_sms: int = 0, eps: float = 1e-5, residual=None,
                        residual_out=None):
    """The reference: h = x (+ residual, rounded to x's dtype; written to residual_out when given),
    y = rmsnorm(h) * weight in float32 rounded to x's dtype, then runtime.fp8.quantize_rows(y)."""
    h = x.float()
    if residual is not None:
        h = (h + residual.float()).to(x.dtype).float()
        if residual_out is not None:
            residual_out.copy_(h)
    rstd = 1.0 / torch.sqrt((h * h).sum(-1, keepdim=True) / h.shape[-1] + eps)
    return _emit_q((h * rstd * weight.float()).to(x.dtype), q_out, scale_out)


def silu_mul_quant_torch(x, q_out, scale_out, num_sms: int = 0):
    """The reference: y = silu(gate) * up in float32 rounded to x's dtype, then quantize_rows(y)."""
    i = x.shape[-1] // 2
    g, u = x[:, :i].float(), x[:, i:].float()
    return _emit_q((g / (1.0 + torch.exp(-g)) * u).to(x.dtype), q_out, scale_out)


def quantize_rows_torch(x, q_out, scale_out, num_sms: int = 0):
    """The reference: runtime.fp8.quantize_rows(x) into the given buffers."""
    return _emit_q(x, q_out, scale_out)


# ------------------------------------------------------------------------------------------ dispatch
def rmsnorm_quant(x, weight, q_out, scale_out, num_sms: int, eps: float = 1e-5, residual=None, residual_out=None):
    """Fp8Rows(q_out [T, H] e4m3, scale_out [T, 1] float32): per-token quantization of rmsnorm(h) * weight,
    h = x (+ residual); residual_out (may alias x or residual) gets h."""
    fn = rmsnorm_quant_triton if use_triton(x) else rmsnorm_quant_torch
    return fn(x, weight, q_out, scale_out, num_sms, eps, residual=residual, residual_out=residual_out)


def silu_mul_quant(x, q_out, scale_out, num_sms: int):
    """Fp8Rows(q_out [T, I] e4m3, scale_out [T, 1]): per-token quantization of silu(x[:, :I]) * x[:, I:]."""
    return (silu_mul_quant_triton if use_triton(x) else silu_mul_quant_torch)(x, q_out, scale_out, num_sms)


def quantize_rows_into(x, q_out, scale_out, num_sms: int):
    """Fp8Rows(q_out [T, K] e4m3, scale_out [T, 1]): runtime.fp8.quantize_rows(x [T, K]), into the buffers."""
    return (quantize_rows_triton if use_triton(x) else quantize_rows_torch)(x, q_out, scale_out, num_sms)
