// Decode attention for every session of a step in two kernels per layer.
//
// Each session contributes one new row (a decode step) at its own position, and keeps its keys
// and values in its own f16 cache, `[capacity, kv_heads * head_dim]` rows. The kernels read
// the caches through arrays of device pointers, one entry per session.
//
//   rope_kv_write:    RoPE of the queries (into q_out) and of the keys; keys and values are
//                     written into each session's cache at its position. Grid: (sessions,
//                     heads + kv_heads), one thread per rotated pair. (rope_kv_write_chunk
//                     does the same for the rows of one session's prompt chunk.)
//   decode_attention: causal grouped-query attention of each query head against its
//                     session's cache, flash-decoding style: each warp keeps a running max,
//                     sum and weighted values over a share of the cached rows (16 warps, 4
//                     rows a warp per iteration), then the block combines its warps and
//                     writes f32, or Q8_1 for the next quantized product (the fused decode
//                     path).
//                     Grid: (heads, sessions, splits): past 64 cached rows, each session's
//                     rows are split over up to 32 CTAs a head (flash-decoding; the host
//                     may set another limit), whose partial results the last of them to
//                     finish combines, so that long contexts are read by many CTAs at once
//                     instead of 16 warps a head.
//   decode_attention_hd128_g{2,4,8}: the same for heads of 128 values, one CTA for the 2, 4
//                     or 8 query heads of a key/value head (see `attention_grouped`).
//   decode_attention_rope_hd128_g{2,4,8}: those with rope_kv_write's work folded in, one
//                     launch a layer (`LLMC_CUDA_ATTN_ROPE=1`; not yet measured on a GPU).
//
// Rounding: keys and values are f16 (the cache); queries, scores, softmax and accumulation are
// f32, as candle's own path on an f16 cache computes them.
#include <cuda_fp16.h>
#include <math_constants.h>

#include "q8_1.cuh"

#define MAX_HD 256
#define WARPS 16
#define ROWS 4

// A pair (x0, x1) rotated by the angle whose cosine and sine are c and s: one function for
// every kernel that rotates, so that all round alike.
__device__ __forceinline__ float2 rope_rot(float x0, float x1, float c, float s)
{
    return make_float2(x0 * c - x1 * s, x0 * s + x1 * c);
}

// RoPE of one row's query head or key head y (y >= heads: key head y - heads, whose value
// head is copied too) at position p, thread j taking pair j: the rotated query into q_out,
// the rotated key and the value into the cache rows kc and vc as f16.
__device__ __forceinline__ void rope_kv_row(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ q_out, __half* __restrict__ kc, __half* __restrict__ vc, int p,
    const float* __restrict__ cos_t, const float* __restrict__ sin_t, int heads, int hd,
    int interleaved, int y, int j)
{
    const int half = hd / 2;
    if (j >= half) return;
    const float c = cos_t[(long long)p * half + j];
    const float s = sin_t[(long long)p * half + j];
    const bool is_q = y < heads;
    const int h = is_q ? y : y - heads;
    int i0, i1;
    if (interleaved) {
        i0 = h * hd + 2 * j;
        i1 = i0 + 1;
    } else {
        i0 = h * hd + j;
        i1 = i0 + half;
    }
    const float* x = is_q ? q : k;
    const float2 rot = rope_rot(x[i0], x[i1], c, s);
    const float y0 = rot.x, y1 = rot.y;
    if (is_q) {
        q_out[i0] = y0;
        q_out[i1] = y1;
        return;
    }
    kc[i0] = __float2half(y0);
    kc[i1] = __float2half(y1);
    vc[h * hd + j] = __float2half(v[h * hd + j]);
    vc[h * hd + j + half] = __float2half(v[h * hd + j + half]);
}

extern "C" __global__ void rope_kv_write(
    const float* __restrict__ q, long long q_stride,
    const float* __restrict__ k, long long k_stride,
    const float* __restrict__ v, long long v_stride,
    float* __restrict__ q_out,
    const unsigned long long* __restrict__ ptrs,  // [2 * sessions]: key caches, then values
    const int* __restrict__ pos,                   // [sessions]
    const float* __restrict__ cos_t, const float* __restrict__ sin_t,  // [max_pos, hd / 2]
    int sessions, int heads, int kv_heads, int hd, int interleaved)
{
    // Block (session b, head y): y < heads rotates query head y; otherwise it rotates key
    // head y - heads into the cache and copies that value head. One thread per pair.
    pdl_trigger();  // the attention kernel may launch (it waits for this one first)
    pdl_wait();     // q, k and v come from the kernel before
    const int b = blockIdx.x;
    const int p = pos[b];
    const long long row = (long long)p * kv_heads * hd;
    rope_kv_row(q + b * q_stride, k + b * k_stride, v + b * v_stride,
                q_out + (long long)b * heads * hd,
                reinterpret_cast<__half*>(ptrs[b]) + row,
                reinterpret_cast<__half*>(ptrs[sessions + b]) + row, p, cos_t, sin_t, heads,
                hd, interleaved, blockIdx.y, threadIdx.x);
}

// The same for the n rows of one session's prompt chunk at positions start..start + n, whose
// cache rows are those positions (not a ring): grid (n, heads + kv_heads), hd / 2 threads.
extern "C" __global__ void rope_kv_write_chunk(
    const float* __restrict__ q, long long q_stride,
    const float* __restrict__ k, long long k_stride,
    const float* __restrict__ v, long long v_stride,
    float* __restrict__ q_out, __half* __restrict__ kc, __half* __restrict__ vc, int start,
    const float* __restrict__ cos_t, const float* __restrict__ sin_t,
    int heads, int kv_heads, int hd, int interleaved)
{
    const long long r = blockIdx.x;
    const int p = start + (int)r;
    const long long row = (long long)p * kv_heads * hd;
    rope_kv_row(q + r * q_stride, k + r * k_stride, v + r * v_stride,
                q_out + r * heads * hd, kc + row, vc + row, p, cos_t, sin_t, heads, hd,
                interleaved, blockIdx.y, threadIdx.x);
}

// Writes value d of head h of session b: as f32 to `out`, or, when `out` is null, into the
// Q8_1 blocks of `out_q8` (whole warps take whole blocks of 32 values, lane = d % 32).
__device__ __forceinline__ void put(float a, float* __restrict__ out,
                                    block_q8_1* __restrict__ out_q8, int out_q8_stride, int b,
                                    int heads, int hd, int h, int d, int lane)
{
    if (out != nullptr) {
        out[(long long)b * heads * hd + h * hd + d] = a;
    } else {
        quantize_block(a, out_q8 + (long long)b * out_q8_stride + (h * hd + d - lane) / QK, lane);
    }
}

// Counts this CTA's partials in (at `c`) once they are visible; true in every thread of the
// CTA that comes last, which combines the splits. The counter is left zero for the next
// layer's launch.
__device__ __forceinline__ bool last_split(unsigned* c, int splits)
{
    __threadfence();
    __syncthreads();
    __shared__ bool last;
    if (threadIdx.x == 0) {
        last = atomicAdd(c, 1u) == (unsigned)splits - 1;
        if (last) *c = 0;
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}

// Value d of a head's output from its splits' partials `all` (`[splits, hd + 2]`: the running
// max, the sum, then the unnormalized values). The last CTA of a head runs this alone while
// the next kernel waits, so its loads go out CS at a time, independent of each other: a
// few round trips to L2 where a loop that used each load at once (and branched on the max
// before loading the rest) waited one or two a split, up to 64 at 32 splits. ONEPASS (an
// experiment of scripts/cuda/matvec_bench.cu): no first pass for the max; each batch is
// folded into a running max, rescaling what was summed when it grows, so one round trip a
// batch, not two.
#define CS 8
template <bool ONEPASS = false>
__device__ __forceinline__ float combine_splits(const float* all, int splits, int hd, int d)
{
    float gmx = -CUDART_INF_F;
    for (int t0 = 0; !ONEPASS && t0 < splits; t0 += CS) {
        float mt[CS];
        // past the last split: its row loaded again (unconditional loads), then dropped
#pragma unroll
        for (int u = 0; u < CS; u++) mt[u] = __ldcg(all + min(t0 + u, splits - 1) * (hd + 2));
#pragma unroll
        for (int u = 0; u < CS; u++) gmx = t0 + u < splits ? fmaxf(gmx, mt[u]) : gmx;
    }
    float gtotal = 0.f, a = 0.f;
    for (int t0 = 0; t0 < splits; t0 += CS) {
        float mt[CS], st[CS], vt[CS];
#pragma unroll
        for (int u = 0; u < CS; u++) {
            const float* p = all + min(t0 + u, splits - 1) * (hd + 2);
            mt[u] = __ldcg(p);
            st[u] = __ldcg(p + 1);
            vt[u] = __ldcg(p + 2 + d);
        }
        // in the order of the splits, skipping those that saw no row, as before
#pragma unroll
        for (int u = 0; u < CS; u++) {
            if (t0 + u < splits && mt[u] != -CUDART_INF_F) {
                if (ONEPASS && mt[u] > gmx) {
                    const float f = expf(gmx - mt[u]);  // 0 for the first split that saw rows
                    gtotal *= f;
                    a *= f;
                    gmx = mt[u];
                }
                const float f = expf(mt[u] - gmx);
                gtotal += st[u] * f;
                a += vt[u] * f;
            }
        }
    }
    return a / gtotal;
}

template <int PER>
__device__ __forceinline__ void attention(
    const float* __restrict__ q,                   // [sessions, heads * hd], rotated
    const unsigned long long* __restrict__ ptrs,  // [2 * sessions]: key caches, then values
    const int* __restrict__ pos,                   // [sessions]: attend to rows 0..=pos
    float* __restrict__ out,                       // [sessions, heads * hd], or null
    block_q8_1* __restrict__ out_q8,               // or [sessions, out_q8_stride] blocks
    int out_q8_stride,
    float* __restrict__ part,      // with splits: [sessions, heads, splits, hd + 2] scratch
    unsigned* __restrict__ count,  // with splits: [sessions, heads], zero (and left zero)
    int sessions, int heads, int kv_heads, int hd, float scale)
{
    // The output goes to `out` as f32, or, when `out` is null, to `out_q8` as Q8_1 blocks of
    // 32 values (hd a multiple of 32), the input of the next quantized product, which may start
    // loading its weights now (`pdl_trigger`, q8_1.cuh).
    pdl_trigger();
    pdl_wait();  // the rotated queries and the cache rows come from rope_kv_write
    const int h = blockIdx.x, b = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int kvh = h / (heads / kv_heads);
    const int kvw = kv_heads * hd;
    // This CTA's share of the session's rows: [lo, hi), possibly empty.
    const int len = pos[b] + 1;
    const int chunk = (len + splits - 1) / splits;
    const int lo = min(len, split * chunk), hi = min(len, lo + chunk);
    const __half* kb = reinterpret_cast<const __half*>(ptrs[b]) + kvh * hd;
    const __half* vb = reinterpret_cast<const __half*>(ptrs[sessions + b]) + kvh * hd;
    const float* qh = q + (long long)b * heads * hd + h * hd;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float qv[PER], acc[PER];
#pragma unroll
    for (int e = 0; e < PER; e++) {
        const int d = lane + 32 * e;
        qv[e] = d < hd ? qh[d] : 0.f;
        acc[e] = 0.f;
    }
    float m = -CUDART_INF_F, l = 0.f;
    // ROWS consecutive rows a warp per iteration, every row's keys and values loaded before
    // any is used, so that a warp has 2 * ROWS row loads in flight per round trip: with one
    // CTA a head the loop is bound by those round trips, not by bandwidth.
    for (int j0 = lo + warp * ROWS; j0 < hi; j0 += WARPS * ROWS) {
        float kx[ROWS][PER], vx[ROWS][PER];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int j = min(j0 + r, hi - 1);  // rows past the end are loaded, then dropped
            const __half* kj = kb + (long long)j * kvw;
            const __half* vj = vb + (long long)j * kvw;
#pragma unroll
            for (int e = 0; e < PER; e++) {
                const int d = lane + 32 * e;
                kx[r][e] = d < hd ? __half2float(kj[d]) : 0.f;
                vx[r][e] = d < hd ? __half2float(vj[d]) : 0.f;
            }
        }
        float sc[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            sc[r] = 0.f;
#pragma unroll
            for (int e = 0; e < PER; e++) sc[r] += qv[e] * kx[r][e];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int r = 0; r < ROWS; ++r) sc[r] += __shfl_xor_sync(0xffffffff, sc[r], o);
        float mn = m;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            sc[r] = j0 + r < hi ? sc[r] * scale : -CUDART_INF_F;
            mn = fmaxf(mn, sc[r]);
        }
        const float cor = expf(m - mn);
        float p[ROWS];
        l *= cor;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            p[r] = j0 + r < hi ? expf(sc[r] - mn) : 0.f;
            l += p[r];
        }
#pragma unroll
        for (int e = 0; e < PER; e++) {
            float x = acc[e] * cor;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) x += p[r] * vx[r][e];
            acc[e] = x;
        }
        m = mn;
    }
    __shared__ float sm[WARPS], sl[WARPS];
    __shared__ float sacc[WARPS][MAX_HD];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < PER; e++) {
        const int d = lane + 32 * e;
        if (d < hd) sacc[warp][d] = acc[e];
    }
    __syncthreads();
    float mx = -CUDART_INF_F;
    for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, sm[w]);
    float total = 0.f, f[WARPS];
    for (int w = 0; w < WARPS; w++) {
        f[w] = sm[w] == -CUDART_INF_F ? 0.f : expf(sm[w] - mx);
        total += sl[w] * f[w];
    }
    if (splits > 1) {
        // Flash-decoding: this CTA's (max, sum, unnormalized output) go to the scratch; the
        // last CTA of the head to finish combines all splits' and writes the output.
        float* mine = part + (((long long)b * heads + h) * splits + split) * (hd + 2);
        for (int d = threadIdx.x; d < hd; d += blockDim.x) {
            float a = 0.f;
            for (int w = 0; w < WARPS; w++) a += sacc[w][d] * f[w];
            mine[2 + d] = a;
        }
        if (threadIdx.x == 0) {
            mine[0] = mx;
            mine[1] = total;
        }
        if (!last_split(count + (long long)b * heads + h, splits)) return;
        const float* all = part + ((long long)b * heads + h) * splits * (hd + 2);
        for (int d = threadIdx.x; d < hd; d += blockDim.x)
            put(combine_splits(all, splits, hd, d), out, out_q8, out_q8_stride, b, heads, hd, h,
                d, lane);
        return;
    }
    // Whole warps take whole blocks of 32 values (hd is a multiple of 32 for Q8_1 output),
    // so every lane of a warp that quantizes takes part in its shuffles.
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < WARPS; w++) a += sacc[w][d] * f[w];
        put(a / total, out, out_q8, out_q8_stride, b, heads, hd, h, d, lane);
    }
}

// The parameters of every decode attention kernel launched after rope_kv_write (the order
// decode_attention.rs passes them in).
#define ATTN_PARAMS                                                                          \
    const float* __restrict__ q, const unsigned long long* __restrict__ ptrs,                \
        const int* __restrict__ pos, float* __restrict__ out,                                \
        block_q8_1* __restrict__ out_q8, int out_q8_stride, float* __restrict__ part,        \
        unsigned* __restrict__ count, int sessions, int heads, int kv_heads, int hd,         \
        float scale

// PER: values of a head a lane holds (head width / 32, rounded up). The generic kernel takes
// any width up to MAX_HD; the ones for widths of 64 and 128 hold only what those need, so
// their registers leave room for more CTAs a multiprocessor.
#define ATTENTION(name, PER, MINB)                                                           \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) name(                     \
        ATTN_PARAMS)                                                                         \
    {                                                                                        \
        attention<PER>(q, ptrs, pos, out, out_q8, out_q8_stride, part, count, sessions,      \
                       heads, kv_heads, hd, scale);                                          \
    }

ATTENTION(decode_attention, MAX_HD / 32, 1)
ATTENTION(decode_attention_hd64, 2, 2)
ATTENTION(decode_attention_hd128, 4, 2)

// The grouped kernels for heads of 128 values (`decode_attention_hd128_g*`).
#include "decode_attention_grouped.cuh"
