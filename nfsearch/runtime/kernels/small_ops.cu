// Fused memory-bound ops of one layer, bf16 in and out, fp32 math. Compiled at run time by NVRTC
// through cupy.RawModule (nfsearch/runtime/kernels/small_ops_cuda.py); no headers needed: bf16 is
// handled as its 16 raw bits. Every kernel walks its work with a grid-stride loop, so the grid
// (set by the caller from the partition's SM count) bounds the SMs it occupies.
//
// Vector width: 8 bf16 = 16 bytes per load/store; the host checks 16-byte alignment.

typedef unsigned short bf16_t;
typedef long long i64;

struct alignas(16) vec8 {
    unsigned a, b, c, d;
};

struct alignas(16) f4 {
    float x, y, z, w;
};

__device__ __forceinline__ unsigned short f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                                 // round to nearest even
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ void unpack8(const vec8 v, float* f) {
    f[0] = __uint_as_float(v.a << 16); f[1] = __uint_as_float(v.a & 0xffff0000u);
    f[2] = __uint_as_float(v.b << 16); f[3] = __uint_as_float(v.b & 0xffff0000u);
    f[4] = __uint_as_float(v.c << 16); f[5] = __uint_as_float(v.c & 0xffff0000u);
    f[6] = __uint_as_float(v.d << 16); f[7] = __uint_as_float(v.d & 0xffff0000u);
}

__device__ __forceinline__ vec8 pack8(const float* f) {
    vec8 v;
    v.a = (unsigned)f2bf(f[0]) | ((unsigned)f2bf(f[1]) << 16);
    v.b = (unsigned)f2bf(f[2]) | ((unsigned)f2bf(f[3]) << 16);
    v.c = (unsigned)f2bf(f[4]) | ((unsigned)f2bf(f[5]) << 16);
    v.d = (unsigned)f2bf(f[6]) | ((unsigned)f2bf(f[7]) << 16);
    return v;
}

__device__ __forceinline__ vec8 ld8(const bf16_t* p) { return *reinterpret_cast<const vec8*>(p); }
__device__ __forceinline__ void st8(bf16_t* p, vec8 v) { *reinterpret_cast<vec8*>(p) = v; }

// ------------------------------------------------------------------------------------------------
// RMSNorm with fused residual add: h = x (+ res); res_out = h; out = h * rsqrt(mean(h^2) + eps) * w.
// One row per CTA at a time; H == ITEMS * blockDim.x * 8 exactly (the host picks ITEMS), so the row
// stays in registers between the sum of squares and the scaling.
template <int ITEMS>
__global__ void rmsnorm_kernel(const bf16_t* __restrict__ x, const bf16_t* __restrict__ res,
                               const bf16_t* __restrict__ w, bf16_t* __restrict__ out, bf16_t* res_out,
                               int T, int H, i64 sx, i64 sr, i64 so, i64 sro, float eps,
                               int has_res, int has_resout) {
    __shared__ float red[32];
    const int tid = threadIdx.x;
    const int nwarps = blockDim.x >> 5;
    float wf[ITEMS][8];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) unpack8(ld8(w + (i * blockDim.x + tid) * 8), wf[i]);
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        float h[ITEMS][8];
        vec8 xv[ITEMS], rv[ITEMS];
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) xv[i] = ld8(x + (i64)t * sx + (i * blockDim.x + tid) * 8);
        if (has_res) {
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) rv[i] = ld8(res + (i64)t * sr + (i * blockDim.x + tid) * 8);
        }
        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            unpack8(xv[i], h[i]);
            if (has_res) {
                float r8[8];
                unpack8(rv[i], r8);
#pragma unroll
                for (int e = 0; e < 8; ++e) h[i][e] += r8[e];
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) ss += h[i][e] * h[i][e];
            if (has_resout) st8(res_out + (i64)t * sro + (i * blockDim.x + tid) * 8, pack8(h[i]));
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if ((tid & 31) == 0) red[tid >> 5] = ss;
        __syncthreads();
        float tot = 0.f;
        for (int k = 0; k < nwarps; ++k) tot += red[k];
        const float rstd = rsqrtf(tot / (float)H + eps);
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            float y[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) y[e] = h[i][e] * rstd * wf[i][e];
            st8(out + (i64)t * so + (i * blockDim.x + tid) * 8, pack8(y));
        }
        __syncthreads();  // red[] is reused by the next row
    }
}

// ------------------------------------------------------------------------------------------------
// SiLU-and-mul: out[t, j] = silu(x[t, j]) * x[t, I + j]; I % 8 == 0. Two vectors per thread per step.
extern "C" __global__ void silu_mul_kernel(const bf16_t* __restrict__ x, bf16_t* __restrict__ out,
                                           i64 T, int I, i64 sx, i64 so) {
    const i64 per_row = I / 8;
    const i64 total = T * per_row;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x; v < total; v += 2 * stride) {
        const i64 v2 = v + stride;
        const bool two = v2 < total;
        const i64 t = v / per_row, j = (v - t * per_row) * 8;
        const i64 t2 = two ? v2 / per_row : t, j2 = two ? (v2 - t2 * per_row) * 8 : j;
        const vec8 g = ld8(x + t * sx + j), u = ld8(x + t * sx + I + j);
        vec8 g2 = g, u2 = u;
        if (two) { g2 = ld8(x + t2 * sx + j2); u2 = ld8(x + t2 * sx + I + j2); }
        float gf[8], uf[8], y[8];
        unpack8(g, gf); unpack8(u, uf);
#pragma unroll
        for (int e = 0; e < 8; ++e) y[e] = gf[e] / (1.f + __expf(-gf[e])) * uf[e];
        st8(out + t * so + j, pack8(y));
        if (two) {
            unpack8(g2, gf); unpack8(u2, uf);
#pragma unroll
            for (int e = 0; e < 8; ++e) y[e] = gf[e] / (1.f + __expf(-gf[e])) * uf[e];
            st8(out + t2 * so + j2, pack8(y));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// RoPE (rotate-half) on q and k heads of qkv[T, (HQ + 2 HKV) * D], then: q -> q_out[T, HQ, D];
// k, v -> caches [slot, pos, h, :] for tokens with slot >= 0; k, v -> k_out/v_out[T, HKV, D] when given.
// A work unit is 8 rotation pairs (elements j..j+7 and D/2+j..D/2+j+7) of one head of one token.
extern "C" __global__ void rope_append_kernel(
    const bf16_t* __restrict__ qkv, const int* __restrict__ pos, const float* __restrict__ cosb,
    const float* __restrict__ sinb, bf16_t* q_out, bf16_t* kc, bf16_t* vc, const int* __restrict__ slot,
    bf16_t* ko, bf16_t* vo, int T, int HQ, int HKV, int D, i64 sx, i64 sqt, i64 sqh,
    i64 skr, i64 skt, i64 skh, i64 svr, i64 svt, i64 svh, i64 skot, i64 skoh, i64 svot, i64 svoh,
    i64 scos, int has_kvout, int vec_cos) {
    const int half = D / 2;
    const int gph = D / 16;
    const int heads = HQ + 2 * HKV;
    const i64 per_tok = (i64)heads * gph;
    const i64 total = (i64)T * per_tok;
    for (i64 u = (i64)blockIdx.x * blockDim.x + threadIdx.x; u < total; u += (i64)gridDim.x * blockDim.x) {
        const int t = (int)(u / per_tok);
        const int rem = (int)(u - (i64)t * per_tok);
        const int hh = rem / gph;
        const int j = (rem - hh * gph) * 8;
        const bf16_t* src = qkv + (i64)t * sx + (i64)hh * D;
        const vec8 a = ld8(src + j), b = ld8(src + half + j);
        const i64 p = pos[t];
        vec8 o1 = a, o2 = b;
        if (hh < HQ + HKV) {
            float x1[8], x2[8], y1[8], y2[8];
            unpack8(a, x1); unpack8(b, x2);
            const float* c = cosb + p * scos + j;
            const float* s = sinb + p * scos + j;
            float cf[8], sf[8];
            if (vec_cos) {  // two 16-byte loads each (host checked the alignment)
                const f4 c0 = reinterpret_cast<const f4*>(c)[0], c1 = reinterpret_cast<const f4*>(c)[1];
                const f4 s0 = reinterpret_cast<const f4*>(s)[0], s1 = reinterpret_cast<const f4*>(s)[1];
                cf[0] = c0.x; cf[1] = c0.y; cf[2] = c0.z; cf[3] = c0.w; cf[4] = c1.x; cf[5] = c1.y; cf[6] = c1.z; cf[7] = c1.w;
                sf[0] = s0.x; sf[1] = s0.y; sf[2] = s0.z; sf[3] = s0.w; sf[4] = s1.x; sf[5] = s1.y; sf[6] = s1.z; sf[7] = s1.w;
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) { cf[e] = c[e]; sf[e] = s[e]; }
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                y1[e] = x1[e] * cf[e] - x2[e] * sf[e];
                y2[e] = x2[e] * cf[e] + x1[e] * sf[e];
            }
            o1 = pack8(y1); o2 = pack8(y2);
        }
        if (hh < HQ) {
            bf16_t* dst = q_out + (i64)t * sqt + (i64)hh * sqh;
            st8(dst + j, o1); st8(dst + half + j, o2);
        } else {
            const bool is_k = hh < HQ + HKV;
            const int kh = is_k ? hh - HQ : hh - HQ - HKV;
            const i64 sl = slot[t];
            if (sl >= 0) {
                bf16_t* dst = is_k ? kc + sl * skr + p * skt + (i64)kh * skh : vc + sl * svr + p * svt + (i64)kh * svh;
                st8(dst + j, o1); st8(dst + half + j, o2);
            }
            if (has_kvout) {
                bf16_t* dst = is_k ? ko + (i64)t * skot + (i64)kh * skoh : vo + (i64)t * svot + (i64)kh * svoh;
                st8(dst + j, o1); st8(dst + half + j, o2);
            }
        }
    }
}
