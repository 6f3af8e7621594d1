// The grouped decode attention kernels for heads of 128 values, part of
// decode_attention.cu's module (included at its end: they use its `put`, `last_split`,
// `combine_splits` and `ROWS`). See decode_attention.cu for the layout of the caches, the
// splits and their scratch.
#pragma once

// The grouped kernel for heads of 128 values: one CTA takes the G query heads that share a
// key/value head, so each cached row is read once for all of them (decode_attention.cu's
// per-head kernels read it once per query head), and each lane loads 4 consecutive values
// of a row in one 8-byte load (a warp reads a row's 256 bytes at once). Grid: (kv_heads,
// sessions, splits); GW warps of ROWS rows an iteration. Partial results and counters are
// laid out as for those kernels, a group's at its first head.
#define GW 8

// 4 consecutive f16 values at `p` as they are stored (8-byte aligned when `vec`).
__device__ __forceinline__ uint2 load4(const __half* p, bool vec)
{
    if (vec) return *reinterpret_cast<const uint2*>(p);
    const __half2 a = __halves2half2(p[0], p[1]), c = __halves2half2(p[2], p[3]);
    return make_uint2(*reinterpret_cast<const uint32_t*>(&a),
                      *reinterpret_cast<const uint32_t*>(&c));
}

// The 4 values of `load4` as f32.
__device__ __forceinline__ void unpack4(uint2 u, float* x)
{
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
    const float2 c = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
    x[0] = a.x;
    x[1] = a.y;
    x[2] = c.x;
    x[3] = c.y;
}

// PF: each warp loads its next rows before it computes the current ones, so that a warp
// has loads in flight while it computes (twice the registers for rows). EARLY: each warp
// loads its first rows before it waits for the kernel before, which writes only the newest
// row (reloaded after the wait). ONEPASS: the last CTA combines the splits in one pass
// (`combine_splits`' ONEPASS). RW: rows a warp an iteration; rows wait in registers as f16
// until they are used.
//
// With `Rope` (`rope`'s fields set), this kernel also does `rope_kv_write`'s work for its
// heads, so that kernel is not launched: q holds the queries before RoPE (rows `q_stride`
// apart); every warp rotates its CTA's query heads, and the newest key row and copies the
// newest value row into registers as f16 (which the loop uses instead of loading that row);
// warp 0 of the CTA whose split holds that row writes it into the cache.
struct Rope {
    long long q_stride;
    const float* k;
    long long k_stride;
    const float* v;
    long long v_stride;
    const float* cos_t;  // [max_pos, 64]
    const float* sin_t;
    int interleaved;
};

// RoPE of this lane's 4 values x (values 4 lane .. 4 lane + 3 of a head of 128) with the
// tables' pairs at position p: interleaved pairs (2j, 2j + 1) are within a lane; halves (j,
// j + 64) are 16 lanes apart.
__device__ __forceinline__ void rope4(float (&x)[4], const float* __restrict__ cos_t,
                                      const float* __restrict__ sin_t, int p, int interleaved,
                                      int lane)
{
    if (interleaved) {
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
            const int j = (4 * lane + e) / 2;
            const float c = cos_t[(long long)p * 64 + j], s = sin_t[(long long)p * 64 + j];
            const float2 y = rope_rot(x[e], x[e + 1], c, s);
            x[e] = y.x;
            x[e + 1] = y.y;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int j = (4 * lane + e) & 63;
            const float c = cos_t[(long long)p * 64 + j], s = sin_t[(long long)p * 64 + j];
            const float other = __shfl_xor_sync(0xffffffff, x[e], 16);
            x[e] = lane < 16 ? rope_rot(x[e], other, c, s).x : rope_rot(other, x[e], c, s).y;
        }
    }
}

// 4 values as f16, packed as `load4` returns them.
__device__ __forceinline__ uint2 pack4(const float (&x)[4])
{
    const __half2 a = __floats2half2_rn(x[0], x[1]), c = __floats2half2_rn(x[2], x[3]);
    return make_uint2(*reinterpret_cast<const uint32_t*>(&a),
                      *reinterpret_cast<const uint32_t*>(&c));
}

// Where a CTA of the grouped kernels works: key/value head kvh (query heads h0 .. h0 + G - 1)
// of session b, rows lo .. hi - 1 of its len, split `split` of `splits`.
struct Span {
    int kvh, b, split, splits, h0, kvw, len, lo, hi, lane, warp;
};

template <int G>
__device__ __forceinline__ Span span_of(const int* __restrict__ pos, int kv_heads)
{
    Span c;
    c.kvh = blockIdx.x;
    c.b = blockIdx.y;
    c.split = blockIdx.z;
    c.splits = gridDim.z;
    c.h0 = c.kvh * G;
    c.kvw = kv_heads * 128;
    c.len = pos[c.b] + 1;
    const int chunk = (c.len + c.splits - 1) / c.splits;
    c.lo = min(c.len, c.split * chunk);
    c.hi = min(c.len, c.lo + chunk);
    c.lane = threadIdx.x & 31;
    c.warp = threadIdx.x >> 5;
    return c;
}

template <int G, bool ONEPASS>
__device__ __forceinline__ void grouped_finish(const Span& c, const float (&m)[G],
                                               const float (&l)[G], const float (&acc)[G][4],
                                               float* __restrict__ out,
                                               block_q8_1* __restrict__ out_q8, int out_q8_stride,
                                               float* __restrict__ part,
                                               unsigned* __restrict__ count, int heads);

template <int G, bool PF, bool EARLY = false, bool ONEPASS = false, int RW = ROWS,
          bool ROPE = false>
__device__ __forceinline__ void attention_grouped(
    const float* __restrict__ q, const unsigned long long* __restrict__ ptrs,
    const int* __restrict__ pos, float* __restrict__ out, block_q8_1* __restrict__ out_q8,
    int out_q8_stride, float* __restrict__ part, unsigned* __restrict__ count, int sessions,
    int heads, int kv_heads, float scale, Rope rope = Rope{})
{
    constexpr int HD = 128;
    pdl_trigger();
    // Positions, cache tables and every cached row but the newest were written before the
    // kernel before started (a kernel starts only once the one before it has), so with EARLY
    // they are read before the wait; the queries and the newest row come from that kernel.
    if (!EARLY) pdl_wait();
    const Span c = span_of<G>(pos, kv_heads);
    const int kvh = c.kvh, b = c.b, h0 = c.h0, kvw = c.kvw, len = c.len, lo = c.lo, hi = c.hi;
    const int lane = c.lane, warp = c.warp;
    const __half* kb = reinterpret_cast<const __half*>(ptrs[b]) + kvh * HD + 4 * lane;
    const __half* vb = reinterpret_cast<const __half*>(ptrs[sessions + b]) + kvh * HD + 4 * lane;
    // rows are kv_heads * 256 bytes apart: aligned rows start aligned
    const bool vec = ((reinterpret_cast<unsigned long long>(kb) |
                       reinterpret_cast<unsigned long long>(vb)) & 7) == 0;
    float qv[G][4], acc[G][4], m[G], l[G];
    // With ROPE, the newest row as this CTA computes it (f16, as the cache holds it).
    uint2 nk = make_uint2(0, 0), nv = make_uint2(0, 0);
    // Rows j0 .. j0 + RW - 1 (clamped: rows past the end are loaded and dropped).
    auto load_rows = [&](int j0, uint2* kx, uint2* vx) {
#pragma unroll
        for (int r = 0; r < RW; ++r) {
            const long long j = min(j0 + r, hi - 1);
            if (ROPE && j == len - 1) {
                kx[r] = nk;
                vx[r] = nv;
            } else {
                kx[r] = load4(kb + j * kvw, vec);
                vx[r] = load4(vb + j * kvw, vec);
            }
        }
    };
    uint2 kx[RW], vx[RW];
    if (EARLY) {
        if (lo + warp * RW < hi) load_rows(lo + warp * RW, kx, vx);
        pdl_wait();
    }
    if (ROPE) {
        const int p = len - 1;
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float* qh = q + b * rope.q_stride + (h0 + g) * HD + 4 * lane;
#pragma unroll
            for (int e = 0; e < 4; e++) qv[g][e] = qh[e];
            rope4(qv[g], rope.cos_t, rope.sin_t, p, rope.interleaved, lane);
        }
        if (lo <= p && p < hi) {
            float k4[4], v4[4];
            const float* kr = rope.k + b * rope.k_stride + kvh * HD + 4 * lane;
            const float* vr = rope.v + b * rope.v_stride + kvh * HD + 4 * lane;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                k4[e] = kr[e];
                v4[e] = vr[e];
            }
            rope4(k4, rope.cos_t, rope.sin_t, p, rope.interleaved, lane);
            nk = pack4(k4);
            nv = pack4(v4);
            if (warp == 0) {
                __half* kw = reinterpret_cast<__half*>(ptrs[b]) + (long long)p * kvw + kvh * HD;
                __half* vw =
                    reinterpret_cast<__half*>(ptrs[sessions + b]) + (long long)p * kvw + kvh * HD;
                const __half2* kh = reinterpret_cast<const __half2*>(&nk);
                const __half2* vh = reinterpret_cast<const __half2*>(&nv);
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    kw[4 * lane + 2 * e] = __low2half(kh[e]);
                    kw[4 * lane + 2 * e + 1] = __high2half(kh[e]);
                    vw[4 * lane + 2 * e] = __low2half(vh[e]);
                    vw[4 * lane + 2 * e + 1] = __high2half(vh[e]);
                }
            }
        }
    }
    if (EARLY && lo + warp * RW < hi) {
        // the newest row (and rows clamped to it), loaded before the wait: as the kernel
        // before wrote it, or as computed above
#pragma unroll
        for (int r = 0; r < RW; ++r)
            if (min(lo + warp * RW + r, hi - 1) == len - 1) {
                kx[r] = ROPE ? nk : load4(kb + (long long)(len - 1) * kvw, vec);
                vx[r] = ROPE ? nv : load4(vb + (long long)(len - 1) * kvw, vec);
            }
    }
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (!ROPE) {
            const float* qh = q + (long long)b * heads * HD + (h0 + g) * HD + 4 * lane;
#pragma unroll
            for (int e = 0; e < 4; e++) qv[g][e] = qh[e];
        }
#pragma unroll
        for (int e = 0; e < 4; e++) acc[g][e] = 0.f;
        m[g] = -CUDART_INF_F;
        l[g] = 0.f;
    }
    if (!EARLY && PF && lo + warp * RW < hi) load_rows(lo + warp * RW, kx, vx);
    const int first = lo + warp * RW;
    for (int j0 = first; j0 < hi; j0 += GW * RW) {
        uint2 kn[RW], vn[RW];
        if (!PF) {
            if (!EARLY || j0 != first) load_rows(j0, kx, vx);
        } else if (j0 + GW * RW < hi) {
            load_rows(j0 + GW * RW, kn, vn);
        }
        float sc[G][RW];
#pragma unroll
        for (int r = 0; r < RW; ++r) {
            float k4[4];
            unpack4(kx[r], k4);
#pragma unroll
            for (int g = 0; g < G; g++) {
                float t = 0.f;
#pragma unroll
                for (int e = 0; e < 4; e++) t += qv[g][e] * k4[e];
                sc[g][r] = t;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int g = 0; g < G; g++)
#pragma unroll
                for (int r = 0; r < RW; ++r)
                    sc[g][r] += __shfl_xor_sync(0xffffffff, sc[g][r], o);
        float p[G][RW], cor[G];
#pragma unroll
        for (int g = 0; g < G; g++) {
            float mn = m[g];
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                sc[g][r] = j0 + r < hi ? sc[g][r] * scale : -CUDART_INF_F;
                mn = fmaxf(mn, sc[g][r]);
            }
            cor[g] = expf(m[g] - mn);
            l[g] *= cor[g];
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                p[g][r] = j0 + r < hi ? expf(sc[g][r] - mn) : 0.f;
                l[g] += p[g][r];
            }
            m[g] = mn;
#pragma unroll
            for (int e = 0; e < 4; e++) acc[g][e] *= cor[g];
        }
#pragma unroll
        for (int r = 0; r < RW; ++r) {
            float v4[4];
            unpack4(vx[r], v4);
#pragma unroll
            for (int g = 0; g < G; g++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[g][e] += p[g][r] * v4[e];
        }
        if (PF && j0 + GW * RW < hi) {
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                kx[r] = kn[r];
                vx[r] = vn[r];
            }
        }
    }
    grouped_finish<G, ONEPASS>(c, m, l, acc, out, out_q8, out_q8_stride, part, count, heads);
}

#define GROUPED(name, G, PF) GROUPED_SHAPE(name, G, PF, 1, ROWS, false, false)
// MINB: CTAs a multiprocessor must hold (which caps the registers); RW: rows a warp an
// iteration; EARLY, ONEPASS as `attention_grouped` takes them.
#define GROUPED_SHAPE(name, G, PF, MINB, RW, EARLY, ONEPASS)                                 \
    extern "C" __global__ void __launch_bounds__(GW * 32, MINB) name(                        \
        ATTN_PARAMS)                                                                         \
    {                                                                                        \
        attention_grouped<G, PF, EARLY, ONEPASS, RW>(q, ptrs, pos, out, out_q8, out_q8_stride, \
                                                     part, count, sessions, heads, kv_heads,  \
                                                     scale);                                  \
    }

// The grouped kernel with `rope_kv_write`'s work (see `Rope`): q, k and v before RoPE.
#define GROUPED_ROPE(name, G, PF, MINB, RW, EARLY, ONEPASS)                                  \
    extern "C" __global__ void __launch_bounds__(GW * 32, MINB) name(                        \
        const float* __restrict__ q, long long q_stride, const float* __restrict__ k,         \
        long long k_stride, const float* __restrict__ v, long long v_stride,                 \
        const unsigned long long* __restrict__ ptrs, const int* __restrict__ pos,            \
        const float* __restrict__ cos_t, const float* __restrict__ sin_t,                    \
        float* __restrict__ out, block_q8_1* __restrict__ out_q8, int out_q8_stride,         \
        float* __restrict__ part, unsigned* __restrict__ count, int sessions, int heads,     \
        int kv_heads, int hd, float scale, int interleaved)                                  \
    {                                                                                        \
        attention_grouped<G, PF, EARLY, ONEPASS, RW, true>(                                  \
            q, ptrs, pos, out, out_q8, out_q8_stride, part, count, sessions, heads, kv_heads, \
            scale, Rope{q_stride, k, k_stride, v, v_stride, cos_t, sin_t, interleaved});      \
    }

GROUPED_ROPE(decode_attention_rope_hd128_g2, 2, false, 1, ROWS, false, false)
GROUPED_ROPE(decode_attention_rope_hd128_g4, 4, false, 1, ROWS, false, false)
GROUPED_ROPE(decode_attention_rope_hd128_g8, 8, false, 1, ROWS, false, false)
GROUPED(decode_attention_hd128_g2, 2, false)
GROUPED(decode_attention_hd128_g4, 4, false)
GROUPED(decode_attention_hd128_g8, 8, false)
GROUPED(decode_attention_hd128_g2_pf, 2, true)
GROUPED(decode_attention_hd128_g4_pf, 4, true)
GROUPED(decode_attention_hd128_g8_pf, 8, true)

// A variant of the grouped kernel for long caches (not yet measured; `matvec_bench.cu` times
// it): a warp takes tiles of 32 rows, a lane a row for the scores, so that a score is one
// lane's sum over the row's 128 values (the queries from shared memory), not 4 values a lane
// and 5 shuffles; a tile's max takes 5 shuffles a head. The weights go to shared memory and
// the values are summed as in the grouped kernel, 4 values a lane, 8 bytes a row a lane.
// Each warp has a tile's 8 KB of keys, then 4 KB of its values at a time, in flight.
// 16 bytes of shared memory, loaded where this is called: the compiler would otherwise keep
// the loop-invariant queries of every tile in registers (220 of them).
__device__ __forceinline__ float4 lds4(const float4* p)
{
    float4 v;
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(a)
                 : "memory");
    return v;
}

template <int G, bool ONEPASS>
__device__ __forceinline__ void attention_rowlane(
    const float* __restrict__ q, const unsigned long long* __restrict__ ptrs,
    const int* __restrict__ pos, float* __restrict__ out, block_q8_1* __restrict__ out_q8,
    int out_q8_stride, float* __restrict__ part, unsigned* __restrict__ count, int sessions,
    int heads, int kv_heads, float scale)
{
    constexpr int HD = 128;
    pdl_trigger();
    pdl_wait();  // the rotated queries and the newest row come from rope_kv_write
    const Span c = span_of<G>(pos, kv_heads);
    const int lane = c.lane, warp = c.warp;
    __shared__ float4 qs[G][HD / 4];
    __shared__ float ps[GW][32][G];
    if (warp == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float* qh = q + (long long)c.b * heads * HD + (c.h0 + g) * HD + 4 * lane;
            qs[g][lane] = make_float4(qh[0], qh[1], qh[2], qh[3]);
        }
    }
    __syncthreads();
    const __half* kbase = reinterpret_cast<const __half*>(ptrs[c.b]) + c.kvh * HD;
    const __half* vb =
        reinterpret_cast<const __half*>(ptrs[sessions + c.b]) + c.kvh * HD + 4 * lane;
    // rows are kv_heads * 256 bytes apart: an aligned first row keeps them all aligned
    const bool k16 = (reinterpret_cast<unsigned long long>(kbase) & 15) == 0;
    const bool vec = (reinterpret_cast<unsigned long long>(vb) & 7) == 0;
    float acc[G][4], m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
        for (int e = 0; e < 4; e++) acc[g][e] = 0.f;
        m[g] = -CUDART_INF_F;
        l[g] = 0.f;
    }
    for (int t0 = c.lo + warp * 32; t0 < c.hi; t0 += GW * 32) {
        const bool ok = t0 + lane < c.hi;
        const __half* kr = kbase + (long long)min(t0 + lane, c.hi - 1) * c.kvw;
        uint4 kw[16];
#pragma unroll
        for (int i = 0; i < 16; i++) {
            if (k16) {
                kw[i] = reinterpret_cast<const uint4*>(kr)[i];
            } else {
                const uint2 a = load4(kr + 8 * i, false), b = load4(kr + 8 * i + 4, false);
                kw[i] = make_uint4(a.x, a.y, b.x, b.y);
            }
        }
        float s[G];
#pragma unroll
        for (int g = 0; g < G; g++) s[g] = 0.f;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            float k8[8];
            unpack4(make_uint2(kw[i].x, kw[i].y), k8);
            unpack4(make_uint2(kw[i].z, kw[i].w), k8 + 4);
#pragma unroll
            for (int g = 0; g < G; g++) {
                const float4 a = lds4(&qs[g][2 * i]), b = lds4(&qs[g][2 * i + 1]);
                s[g] += a.x * k8[0] + a.y * k8[1] + a.z * k8[2] + a.w * k8[3] + b.x * k8[4] +
                        b.y * k8[5] + b.z * k8[6] + b.w * k8[7];
            }
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float sc = ok ? s[g] * scale : -CUDART_INF_F;
            const float mn = fmaxf(m[g], warp_max(sc));  // lane 0's row is always there
            const float cor = expf(m[g] - mn);
            const float p = ok ? expf(sc - mn) : 0.f;
            l[g] = l[g] * cor + p;  // this lane's share; summed over the warp at the end
#pragma unroll
            for (int e = 0; e < 4; e++) acc[g][e] *= cor;
            m[g] = mn;
            ps[warp][lane][g] = p;
        }
        __syncwarp();
        // the values in two halves of 16 rows (registers for one half's loads)
#pragma unroll
        for (int h = 0; h < 32; h += 16) {
            uint2 vr[16];
#pragma unroll
            for (int r = 0; r < 16; r++)
                vr[r] = load4(vb + (long long)min(t0 + h + r, c.hi - 1) * c.kvw, vec);
#pragma unroll
            for (int r = 0; r < 16; r++) {
                float v4[4];
                unpack4(vr[r], v4);
#pragma unroll
                for (int g = 0; g < G; g++) {
                    const float p = ps[warp][h + r][g];  // 0 past the split's last row
#pragma unroll
                    for (int e = 0; e < 4; e++) acc[g][e] += p * v4[e];
                }
            }
        }
        __syncwarp();
    }
#pragma unroll
    for (int g = 0; g < G; g++) l[g] = warp_sum(l[g]);
    grouped_finish<G, ONEPASS>(c, m, l, acc, out, out_q8, out_q8_stride, part, count, heads);
}

#define GROUPED_ROWLANE(name, G, MINB, ONEPASS)                                              \
    extern "C" __global__ void __launch_bounds__(GW * 32, MINB) name(                        \
        ATTN_PARAMS)                                                                         \
    {                                                                                        \
        attention_rowlane<G, ONEPASS>(q, ptrs, pos, out, out_q8, out_q8_stride, part, count,  \
                                      sessions, heads, kv_heads, scale);                      \
    }

// The end of a grouped kernel: the CTA's warps' (max, sum, unnormalized values) combined, then
// written (one split), or put in the scratch, the last CTA of the group combining every
// split's.
template <int G, bool ONEPASS>
__device__ __forceinline__ void grouped_finish(const Span& c, const float (&m)[G],
                                               const float (&l)[G], const float (&acc)[G][4],
                                               float* __restrict__ out,
                                               block_q8_1* __restrict__ out_q8, int out_q8_stride,
                                               float* __restrict__ part,
                                               unsigned* __restrict__ count, int heads)
{
    constexpr int HD = 128;
    __shared__ float sm[GW][G], sl[GW][G];
    __shared__ float sacc[GW][G][HD];
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (c.lane == 0) {
            sm[c.warp][g] = m[g];
            sl[c.warp][g] = l[g];
        }
#pragma unroll
        for (int e = 0; e < 4; e++) sacc[c.warp][g][4 * c.lane + e] = acc[g][e];
    }
    __syncthreads();
    // Thread t takes value d of head g for t = g * HD + d (and so on, blockDim apart): whole
    // warps take whole blocks of 32 values, as the Q8_1 output needs. With splits, this CTA's
    // (max, sum, unnormalized values) go to the scratch, and the last CTA of the group to
    // finish combines every split's.
    for (int t = threadIdx.x; t < G * HD; t += blockDim.x) {
        const int g = t / HD, d = t % HD, h = c.h0 + g;
        float mx = -CUDART_INF_F;
        for (int w = 0; w < GW; w++) mx = fmaxf(mx, sm[w][g]);
        float a = 0.f, total = 0.f;
        for (int w = 0; w < GW; w++) {
            const float f = sm[w][g] == -CUDART_INF_F ? 0.f : expf(sm[w][g] - mx);
            a += sacc[w][g][d] * f;
            total += sl[w][g] * f;
        }
        if (c.splits == 1) {
            put(a / total, out, out_q8, out_q8_stride, c.b, heads, HD, h, d, c.lane);
            continue;
        }
        float* mine = part + (((long long)c.b * heads + h) * c.splits + c.split) * (HD + 2);
        mine[2 + d] = a;
        if (d == 0) {
            mine[0] = mx;
            mine[1] = total;
        }
    }
    if (c.splits == 1 || !last_split(count + (long long)c.b * heads + c.h0, c.splits)) return;
    for (int t = threadIdx.x; t < G * HD; t += blockDim.x) {
        const int g = t / HD, d = t % HD, h = c.h0 + g;
        const float* all = part + ((long long)c.b * heads + h) * c.splits * (HD + 2);
        put(combine_splits<ONEPASS>(all, c.splits, HD, d), out, out_q8, out_q8_stride, c.b,
            heads, HD, h, d, c.lane);
    }
}
