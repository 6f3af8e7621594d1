// A prompt chunk's products on f16 tensor cores (`f16_gemm.rs`): the quantized weight
// dequantized to f16 rows, and the chunk's f32 activations cast to f16, for one cuBLAS
// product. The block layouts are GGML's (ggml-common.h); each thread writes whole 16-byte
// runs of f16 values, so a warp's stores cover contiguous memory.
#include <cuda_fp16.h>
#include <stdint.h>

typedef unsigned long long u64;

// 8 f16 values as one 16-byte store
static __device__ __forceinline__ void store8(__half* out, const float* v) {
    __half2 h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(h);
}

static __device__ __forceinline__ float f16_at(const uint8_t* p) {
    return __half2float(*reinterpret_cast<const __half*>(p));
}

// The 32 values of a block whose 16 bytes of nibbles are `q` (value j: the low nibble of byte j,
// value j + 16: its high nibble), as 16-byte stores to `o`: d * (nibble - 8) (Q4_0), or, MIN,
// d * nibble + m (Q4_1).
template <bool MIN>
static __device__ __forceinline__ void store_nibbles(const uint8_t (&q)[16], float d, float m,
                                                     __half* o) {
    float v[8];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int byte = q[r * 8 + i];
                const int n = h ? byte >> 4 : byte & 15;
                v[i] = MIN ? d * (float)n + m : d * (float)(n - 8);
            }
            store8(o + h * 16 + r * 8, v);
        }
    }
}

// Q4_0, 18 bytes a block of 32: f16 d, then 16 bytes of nibbles (`store_nibbles`), read two
// at a time (blocks are only 2-byte aligned). One thread a block.
extern "C" __global__ void dequant_q4_0_f16(const uint8_t* __restrict__ w, __half* __restrict__ out,
                                            u64 blocks) {
    const u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const uint8_t* p = w + b * 18;
    uint8_t q[16];
#pragma unroll
    for (int i = 0; i < 8; ++i) *reinterpret_cast<uint16_t*>(q + 2 * i) =
        *reinterpret_cast<const uint16_t*>(p + 2 + 2 * i);
    store_nibbles<false>(q, f16_at(p), 0.0f, out + b * 32);
}

// Q4_1, 20 bytes a block of 32: f16 d, f16 m, then 16 bytes of nibbles as Q4_0's, read four
// at a time.
extern "C" __global__ void dequant_q4_1_f16(const uint8_t* __restrict__ w, __half* __restrict__ out,
                                            u64 blocks) {
    const u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const uint8_t* p = w + b * 20;
    uint8_t q[16];
#pragma unroll
    for (int i = 0; i < 4; ++i) *reinterpret_cast<uint32_t*>(q + 4 * i) =
        *reinterpret_cast<const uint32_t*>(p + 4 + 4 * i);
    store_nibbles<true>(q, f16_at(p), f16_at(p + 2), out + b * 32);
}

// Q8_0, 34 bytes a block of 32: f16 d, then 32 signed bytes; value = d * q.
extern "C" __global__ void dequant_q8_0_f16(const uint8_t* __restrict__ w, __half* __restrict__ out,
                                            u64 blocks) {
    const u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const uint8_t* p = w + b * 34;
    const float d = f16_at(p);
    __half* o = out + b * 32;
    float v[8];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint16_t two = *reinterpret_cast<const uint16_t*>(p + 2 + r * 8 + 2 * i);
            v[2 * i] = d * (float)(int8_t)(two & 0xff);
            v[2 * i + 1] = d * (float)(int8_t)(two >> 8);
        }
        store8(o + r * 8, v);
    }
}

// The 6-bit scale and minimum of sub-block j of a Q4_K or Q5_K super-block (12 bytes of them).
static __device__ __forceinline__ void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Q4_K, 144 bytes a super-block of 256: f16 d, f16 dmin, 12 bytes of scales, 128 bytes of
// nibbles. Values 64 j .. 64 j + 31 are d * sc(2 j) * low nibble of bytes 32 j .. 32 j + 31,
// minus dmin * m(2 j); the next 32 take the high nibbles and sub-block 2 j + 1. One thread a
// quarter (64 values).
extern "C" __global__ void dequant_q4_k_f16(const uint8_t* __restrict__ w, __half* __restrict__ out,
                                            u64 quarters) {
    const u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= quarters) return;
    const u64 b = t >> 2;
    const int j = (int)(t & 3);
    const uint8_t* p = w + b * 144;
    const float d = f16_at(p), dmin = f16_at(p + 2);
    int sc, m;
    scale_min_k4(2 * j, p + 4, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(2 * j + 1, p + 4, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    const uint4* qs = reinterpret_cast<const uint4*>(p + 16 + 32 * j);
    __half* o = out + b * 256 + 64 * j;
    float v[8];
#pragma unroll
    for (int half16 = 0; half16 < 2; ++half16) {
        const uint4 four = qs[half16];
        const uint8_t* q = reinterpret_cast<const uint8_t*>(&four);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = d1 * (float)(q[r * 8 + i] & 15) - m1;
            store8(o + half16 * 16 + r * 8, v);
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = d2 * (float)(q[r * 8 + i] >> 4) - m2;
            store8(o + 32 + half16 * 16 + r * 8, v);
        }
    }
}

// Q5_K, 176 bytes a super-block of 256: f16 d, f16 dmin, 12 bytes of scales, 32 bytes of high
// bits, 128 bytes of nibbles. As Q4_K, with bit 2 j (low nibbles) or 2 j + 1 (high) of the
// high-bit byte l adding 16. One thread a quarter.
extern "C" __global__ void dequant_q5_k_f16(const uint8_t* __restrict__ w, __half* __restrict__ out,
                                            u64 quarters) {
    const u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= quarters) return;
    const u64 b = t >> 2;
    const int j = (int)(t & 3);
    const uint8_t* p = w + b * 176;
    const float d = f16_at(p), dmin = f16_at(p + 2);
    int sc, m;
    scale_min_k4(2 * j, p + 4, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(2 * j + 1, p + 4, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    const uint8_t* qh = p + 16;
    const uint8_t* ql = p + 48 + 32 * j;
    const int u1 = 1 << (2 * j), u2 = 2 << (2 * j);
    __half* o = out + b * 256 + 64 * j;
    float v[8];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int l = r * 8 + i;
            v[i] = d1 * (float)((ql[l] & 15) + (qh[l] & u1 ? 16 : 0)) - m1;
        }
        store8(o + r * 8, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int l = r * 8 + i;
            v[i] = d2 * (float)((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
        }
        store8(o + 32 + r * 8, v);
    }
}

// Q6_K, 210 bytes a super-block of 256: 128 bytes of low nibbles (ql), 64 of high bit pairs
// (qh), 16 signed scales, f16 d. Each half of 128 values reads 64 bytes of ql and 32 of qh:
// for l < 32, values l, l + 32, l + 64, l + 96 take the low nibble of ql[l], of ql[l + 32],
// the high nibble of ql[l], of ql[l + 32], with bit pairs 0, 1, 2, 3 of qh[l] above them,
// minus 32, times d and the scale of their 16. One thread an eighth: a half's l from 8 r.
extern "C" __global__ void dequant_q6_k_f16(const uint8_t* __restrict__ w, __half* __restrict__ out,
                                            u64 eighths) {
    const u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= eighths) return;
    const u64 b = t >> 3;
    const int half = (int)((t >> 2) & 1), r = (int)(t & 3);
    const uint8_t* p = w + b * 210;
    const float d = f16_at(p + 208);
    const uint8_t* ql = p + 64 * half;
    const uint8_t* qh = p + 128 + 32 * half;
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192 + 8 * half);
    const int is = r / 2;  // l = 8 r .. 8 r + 7 lies in the scale's 16 of l / 16
    __half* o = out + b * 256 + 128 * half + 8 * r;
    float v[8];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float s = d * (float)sc[is + 2 * k];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int l = 8 * r + i;
            const int low = (k & 1) ? ql[l + 32] : ql[l];
            const int nib = (k & 2) ? low >> 4 : low & 15;
            const int q = (nib | (((qh[l] >> (2 * k)) & 3) << 4)) - 32;
            v[i] = s * (float)q;
        }
        store8(o + 32 * k, v);
    }
}

// f32 activations to f16, 8 values a thread (n a multiple of 8; `x` needs only 4-byte
// alignment, a view's rows may start anywhere). Values beyond f16's range are clamped to its
// largest (65,504) rather than made infinite; NaN stays NaN.
extern "C" __global__ void f32_to_f16_x8(const float* __restrict__ x, __half* __restrict__ out,
                                         u64 eights) {
    const u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= eights) return;
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float f = x[8 * t + i];
        v[i] = isnan(f) ? f : fminf(fmaxf(f, -65504.0f), 65504.0f);
    }
    store8(out + 8 * t, v);
}
