// Decode attention for every session of a step in two kernels per layer.
//
// Each session contributes one new row (a decode step) at its own position, and keeps its keys
// and values in its own f16 cache, `[capacity, kv_heads * head_dim]` rows. The kernels read
// the caches through arrays of device pointers, one entry per session.
//
//   rope_kv_write:    RoPE of the queries (into q_out) and of the keys; keys and values are
//                     written into each session's cache at its position. Grid: (sessions,
//                     heads + kv_heads), one thread per rotated pair.
//   decode_attention: causal grouped-query attention of each query head against its
//                     session's cache, flash-decoding style: each warp keeps a running max,
//                     sum and weighted values over a strided share of the cached rows (two
//                     rows per iteration), then the block combines its warps and writes f32,
//                     or Q8_1 for the next quantized product (the fused decode path).
//                     Grid: (heads, sessions).
//
// Rounding: keys and values are f16 (the cache); queries, scores, softmax and accumulation are
// f32, as candle's own path on an f16 cache computes them.
#include <cuda_fp16.h>
#include <math_constants.h>

#include "q8_1.cuh"

#define MAX_HD 256
#define WARPS 8

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
    const int b = blockIdx.x, y = blockIdx.y, j = threadIdx.x;
    const int half = hd / 2;
    if (j >= half) return;
    const int p = pos[b];
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
    const float* x = is_q ? q + b * q_stride : k + b * k_stride;
    const float x0 = x[i0], x1 = x[i1];
    const float y0 = x0 * c - x1 * s;
    const float y1 = x0 * s + x1 * c;
    if (is_q) {
        float* qo = q_out + (long long)b * heads * hd;
        qo[i0] = y0;
        qo[i1] = y1;
        return;
    }
    const long long row = (long long)p * kv_heads * hd;
    __half* kc = reinterpret_cast<__half*>(ptrs[b]) + row;
    __half* vc = reinterpret_cast<__half*>(ptrs[sessions + b]) + row;
    kc[i0] = __float2half(y0);
    kc[i1] = __float2half(y1);
    const float* vr = v + b * v_stride + h * hd;
    vc[h * hd + j] = __float2half(vr[j]);
    vc[h * hd + j + half] = __float2half(vr[j + half]);
}

extern "C" __global__ void decode_attention(
    const float* __restrict__ q,                   // [sessions, heads * hd], rotated
    const unsigned long long* __restrict__ ptrs,  // [2 * sessions]: key caches, then values
    const int* __restrict__ pos,                   // [sessions]: attend to rows 0..=pos
    float* __restrict__ out,                       // [sessions, heads * hd], or null
    block_q8_1* __restrict__ out_q8,               // or [sessions, out_q8_stride] blocks
    int out_q8_stride,
    int sessions, int heads, int kv_heads, int hd, float scale)
{
    // The output goes to `out` as f32, or, when `out` is null, to `out_q8` as Q8_1 blocks of
    // 32 values (hd a multiple of 32), the input of the next quantized product, which may start
    // loading its weights now (`pdl_trigger`, q8_1.cuh).
    pdl_trigger();
    pdl_wait();  // the rotated queries and the cache rows come from rope_kv_write
    const int h = blockIdx.x, b = blockIdx.y;
    const int kvh = h / (heads / kv_heads);
    const int kvw = kv_heads * hd;
    const int len = pos[b] + 1;
    const __half* kb = reinterpret_cast<const __half*>(ptrs[b]) + kvh * hd;
    const __half* vb = reinterpret_cast<const __half*>(ptrs[sessions + b]) + kvh * hd;
    const float* qh = q + (long long)b * heads * hd + h * hd;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    constexpr int PER = MAX_HD / 32;
    float qv[PER], acc[PER];
#pragma unroll
    for (int e = 0; e < PER; e++) {
        const int d = lane + 32 * e;
        qv[e] = d < hd ? qh[d] : 0.f;
        acc[e] = 0.f;
    }
    float m = -CUDART_INF_F, l = 0.f;
    // Two rows per iteration (j and j + WARPS): both rows' loads are in flight together, where
    // one row at a time waited a memory round trip per row.
    for (int j = warp; j < len; j += 2 * WARPS) {
        const int j2 = j + WARPS;
        const bool two = j2 < len;
        const __half* kj = kb + (long long)j * kvw;
        const __half* kj2 = kb + (long long)(two ? j2 : j) * kvw;
        float sc = 0.f, sc2 = 0.f;
#pragma unroll
        for (int e = 0; e < PER; e++) {
            const int d = lane + 32 * e;
            if (d < hd) {
                sc += qv[e] * __half2float(kj[d]);
                sc2 += qv[e] * __half2float(kj2[d]);
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            sc += __shfl_xor_sync(0xffffffff, sc, o);
            sc2 += __shfl_xor_sync(0xffffffff, sc2, o);
        }
        sc *= scale;
        sc2 *= scale;
        const float mn = two ? fmaxf(m, fmaxf(sc, sc2)) : fmaxf(m, sc);
        const float cor = expf(m - mn);
        const float pj = expf(sc - mn);
        const float pj2 = two ? expf(sc2 - mn) : 0.f;
        l = l * cor + pj + pj2;
        const __half* vj = vb + (long long)j * kvw;
        const __half* vj2 = vb + (long long)(two ? j2 : j) * kvw;
#pragma unroll
        for (int e = 0; e < PER; e++) {
            const int d = lane + 32 * e;
            if (d < hd) {
                acc[e] = acc[e] * cor + pj * __half2float(vj[d]) + pj2 * __half2float(vj2[d]);
            }
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
    // Whole warps take whole blocks of 32 values (hd is a multiple of 32 for Q8_1 output),
    // so every lane of a warp that quantizes takes part in its shuffles.
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < WARPS; w++) a += sacc[w][d] * f[w];
        a /= total;
        if (out != nullptr) {
            out[(long long)b * heads * hd + h * hd + d] = a;
        } else {
            quantize_block(a, out_q8 + (long long)b * out_q8_stride + (h * hd + d - lane) / QK,
                           lane);
        }
    }
}
