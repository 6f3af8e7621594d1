// Quantized matrix-vector products for decode steps, Q4_0 and Q8_0 weights in their GGUF
// blocks, activations as Q8_1 blocks (`q8_1.cuh`): dst[c * stride_dst + r] = W[r] . y[c] for
// up to 8 activation rows c. Same arguments and results as candle's `mmvq` kernels, which
// `matvec.rs` falls back to where these do not apply.
//
// Why our own: ncu showed candle's mmvq (llama.cpp's older port) reading the 8B model's
// weights at ~1.8 TB/s of the H100's ~3.0. GGUF blocks of 18 and 34 bytes are only 2-byte
// aligned, so it reads weights two bytes at a time, one CTA a row, and re-reads the
// activation for every row. A first kernel of ours that read each block as 8-byte words from
// the aligned window around it reached only 1.3-1.9 TB/s: neighbouring lanes' windows overlap,
// so every sector was requested several times. Here every global load is a fully coalesced
// 16-byte load and every byte is requested once:
//   - a CTA of W warps takes W * R = 8 rows (R a warp), in passes of 128 blocks (4096 values);
//   - per pass, the CTA copies the activation rows' 128 Q8_1 blocks to shared memory, and each
//     warp its R rows' 128 weight blocks, 16 bytes a lane per load;
//   - lane l then takes the group of 4 blocks 4l..4l+3: 72 (Q4_0) or 136 (Q8_0) bytes of each
//     row, read as 8-byte words, and 144 bytes of each activation row, read as 16-byte words,
//     both free of bank conflicts; inside a group every block's offset is a constant, so the
//     shifts that align its fields are resolved at compile time.
// Rows must hold a multiple of 8 blocks (256 values), so that rows and passes start 16-byte
// aligned; Q8_1 rows must start 16-byte aligned (candle's padding to 512 values does).
//
// Programmatic dependent launch (sm_90, `pdl.rs`): the weights do not depend on the kernel
// before, only the activations do. These kernels may start while the kernel before still runs
// (that kernel says so early with `pdl_trigger`, `q8_1.cuh`); each CTA loads its first pass
// of weights, then waits for the kernel before to finish (`pdl_wait`) before it reads the
// activations or writes anything. The small kernels between the products (norm, attention,
// SiLU) then overlap the weight reads.
#include "q8_1.cuh"

// Rows a CTA: W warps of R rows (the launch shapes in `matvec.rs` must agree).
#define CTA_ROWS 8
// Blocks of 32 values a pass: 4 to a lane (128 values).
#define PASS 128

// The 32-bit word at byte offset `p` (even) of `w`; `p` is a compile-time constant after
// unrolling, so this is a register move or one funnel shift.
template <int N>
__device__ __forceinline__ uint32_t word_at(const uint32_t (&w)[N], int p)
{
    return (p & 3) == 0 ? w[p >> 2] : __funnelshift_r(w[p >> 2], w[(p >> 2) + 1], 16);
}

// The half at byte offset `p` (even) of `w`.
template <int N>
__device__ __forceinline__ float half_at(const uint32_t (&w)[N], int p)
{
    const uint32_t x = w[p >> 2];
    return __half2float(__ushort_as_half((uint16_t)((p & 3) == 0 ? x & 0xffffu : x >> 16)));
}

// `N` 32-bit words from shared memory at byte offset `p`, which is even but may be 2 mod 4
// (Q6_K's 210-byte blocks): N + 1 aligned loads, funnel-shifted by 0 or 16 bits.
template <int N>
__device__ __forceinline__ void words_at(const uint8_t* s, int p, uint32_t (&out)[N])
{
    const uint32_t* a = reinterpret_cast<const uint32_t*>(s + (p & ~3));
    const uint32_t sh = (p & 2) * 8;
    uint32_t prev = a[0];
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const uint32_t next = a[i + 1];
        out[i] = __funnelshift_r(prev, next, sh);
        prev = next;
    }
}

// The `N` 32-bit words at byte offset `p` (a multiple of sizeof(V)), as loads of V (uint2:
// 8 bytes, uint4: 16).
template <class V, int N>
__device__ __forceinline__ void words_as(const uint8_t* s, int p, uint32_t (&out)[N])
{
    constexpr int K = sizeof(V) / 4;
    const V* a = reinterpret_cast<const V*>(s + p);
#pragma unroll
    for (int i = 0; i < N / K; ++i) {
        const V x = a[i];
        const uint32_t* w = reinterpret_cast<const uint32_t*>(&x);
#pragma unroll
        for (int j = 0; j < K; ++j) out[K * i + j] = w[j];
    }
}

// ---- Weight formats ---------------------------------------------------------------------
// A format says how a lane reads its 128 values of a pass (the pass's Q8_1 blocks 4l..4l+3 of
// lane l) from a row's pass in shared memory, and how it dots them with one of those
// activation blocks:
//   G8      bytes of 256 values (8 blocks of 32, or one K-quant super-block);
//   Unit    what a lane keeps in registers for one row;
//   load    fills a Unit from the row's pass at `s`;
//   dot     Unit's k-th block of 32 values (k a compile-time constant) against one Q8_1
//           block: its 8 words of int8 values `u` and its (scale, sum) `ds`.
// The simple formats (one scale a 32-value block) take 4 whole blocks a lane, contiguous; the
// K-quants half a super-block, lane l the half l & 1 of super-block l >> 1.

// The fifth bits of Q5_0/Q5_1 values 4m..4m+3 (bits 0..3 of `h`), moved to bit 4 of each
// byte.
__device__ __forceinline__ int fifth_bits(uint32_t h)
{
    return (int)(((h << 4) & 0x00000010u) | ((h << 11) & 0x00001000u) |
                 ((h << 18) & 0x00100000u) | ((h << 25) & 0x10000000u));
}

// The simple formats: blocks of 32 values with one f16 scale d, BYTES a block. MIN: an f16
// min m follows d, values q * d + m (Q4_1, Q5_1); else values (q - offset) * d, offset 8 for
// 4-bit and 16 for 5-bit values. QH: 4 bytes of fifth bits follow (bit j: value j; Q5_0,
// Q5_1). Then 16 bytes of nibbles (byte j: value j low, value j + 16 high), or, Q8, 32 int8
// values (Q8_0). A lane takes 4 whole blocks, contiguous.
template <int BYTES, bool MIN, bool QH, bool Q8>
struct Blocks {
    static constexpr int G8 = 8 * BYTES;
    struct Unit { uint32_t g[BYTES]; };  // 4 blocks: 4 * BYTES bytes
    static __device__ __forceinline__ void load(const uint8_t* s, int lane, Unit& u)
    {
        words_as<uint2>(s, lane * 4 * BYTES, u.g);
    }
    template <int K>
    static __device__ __forceinline__ float dot(const Unit& w, const int (&u)[8], float2 ds)
    {
        constexpr int B = K * BYTES, HEAD = MIN ? 4 : 2, Q = B + HEAD + (QH ? 4 : 0);
        int s = 0;
        if (Q8) {
#pragma unroll
            for (int m = 0; m < 8; ++m) s = __dp4a((int)word_at(w.g, Q + 4 * m), u[m], s);
            return half_at(w.g, B) * ds.x * (float)s;
        }
        const uint32_t qh = QH ? word_at(w.g, B + HEAD) : 0;
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const int q = (int)word_at(w.g, Q + 4 * m);
            int lo = q & 0x0F0F0F0F, hi = (q >> 4) & 0x0F0F0F0F;
            if (QH) {
                lo |= fifth_bits(qh >> (4 * m));
                hi |= fifth_bits(qh >> (4 * m + 16));
            }
            s = __dp4a(lo, u[m], s);
            s = __dp4a(hi, u[m + 4], s);
        }
        if (MIN) return half_at(w.g, B) * (float)s * ds.x + half_at(w.g, B + 2) * ds.y;
        return half_at(w.g, B) * ((float)s * ds.x - (QH ? 16.0f : 8.0f) * ds.y);
    }
};

using Q4_0 = Blocks<18, false, false, false>;
using Q4_1 = Blocks<20, true, false, false>;
using Q5_0 = Blocks<22, false, true, false>;
using Q5_1 = Blocks<24, true, true, false>;
using Q8_0 = Blocks<34, false, false, true>;

// The scales and mins of sub-blocks 4h..4h+3 of a Q4_K/Q5_K super-block, 6 bits each, from
// its 12 scale bytes (words s0, s1, s2), one byte a sub-block: for h = 0 the low 6 bits of
// bytes 0-3 and 4-7; for h = 1 the nibbles of bytes 8-11 with the top 2 bits of bytes 0-3
// (scales) and 4-7 (mins) above them.
__device__ __forceinline__ void k4_scales(uint32_t s0, uint32_t s1, uint32_t s2, int h, float d,
                                          float dmin, float (&dsc)[4], float (&dm)[4])
{
    const uint32_t sc = h ? (s2 & 0x0F0F0F0Fu) | ((s0 >> 2) & 0x30303030u) : s0 & 0x3F3F3F3Fu;
    const uint32_t mn =
        h ? ((s2 >> 4) & 0x0F0F0F0Fu) | ((s1 >> 2) & 0x30303030u) : s1 & 0x3F3F3F3Fu;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        dsc[k] = d * (float)((sc >> (8 * k)) & 0xFF);
        dm[k] = dmin * (float)((mn >> (8 * k)) & 0xFF);
    }
}

// Q4_K and Q5_K: super-blocks of 256 values: d, dmin, 12 bytes of 6-bit scales and mins;
// for Q5_K (QH) 32 bytes of fifth bits (bit j of byte l: value l of sub-block j); then 128
// bytes of nibbles (bytes 32c..32c+31 hold sub-block 2c in their low nibbles and 2c+1 in
// their high ones). Values (nibble, with its fifth bit) * d * scale - dmin * min; 144 bytes
// (Q4_K) or 176 (Q5_K).
template <bool QH>
struct KBlocks {
    static constexpr int G8 = QH ? 176 : 144;
    static constexpr int QS = QH ? 48 : 16;  // offset of the nibbles
    struct Unit {
        uint32_t q[16];
        uint32_t qh[QH ? 8 : 1];  // shifted right by 4h: bit k is sub-block 4h + k's
        float dsc[4], dm[4];
    };
    static __device__ __forceinline__ void load(const uint8_t* s, int lane, Unit& u)
    {
        const int h = lane & 1, b = (lane >> 1) * G8;
        const uint4 hd = *reinterpret_cast<const uint4*>(s + b);
        if (QH) {
            words_as<uint4>(s, b + 16, u.qh);
#pragma unroll
            for (int i = 0; i < 8; ++i) u.qh[i] >>= 4 * h;
        }
        words_as<uint4>(s, b + QS + 64 * h, u.q);
        const float2 d = __half22float2(*reinterpret_cast<const half2*>(&hd.x));
        k4_scales(hd.y, hd.z, hd.w, h, d.x, d.y, u.dsc, u.dm);
    }
    template <int K>
    static __device__ __forceinline__ float dot(const Unit& w, const int (&u)[8], float2 ds)
    {
        int s = 0;
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            uint32_t v = (w.q[8 * (K >> 1) + m] >> (4 * (K & 1))) & 0x0F0F0F0Fu;
            if (QH) v |= ((w.qh[m] >> K) & 0x01010101u) << 4;
            s = __dp4a((int)v, u[m], s);
        }
        return w.dsc[K] * ds.x * (float)s - w.dm[K] * ds.y;
    }
};

using Q4_K = KBlocks<false>;
using Q5_K = KBlocks<true>;

// Q6_K: 210-byte super-blocks: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16
// int8 scales (one a 16 values), d last. Each half of 128 values takes 64 low bytes, 32 high
// bytes and 8 scales; its value 32g + l is (low nibble of byte l + 32 (g & 1), shifted by 4
// for g >= 2) | (bits 2g, 2g + 1 of high byte l) << 4, less 32, times d * scale[2g + l / 16].
// Blocks are only 2-byte aligned, so a lane reads its words with `words_at`.
struct Q6_K {
    static constexpr int G8 = 210;
    struct Unit {
        uint32_t ql[16];
        uint32_t qh[8];
        float dsc[8];
    };
    static __device__ __forceinline__ void load(const uint8_t* s, int lane, Unit& u)
    {
        const int h = lane & 1;
        const int b = (lane >> 1) * 210;
        words_at(s, b + 64 * h, u.ql);
        words_at(s, b + 128 + 32 * h, u.qh);
        uint32_t sc[2];
        words_at(s, b + 192 + 8 * h, sc);
        const uint32_t dw = *reinterpret_cast<const uint32_t*>(s + ((b + 208) & ~3));
        const float d = __half2float(
            __ushort_as_half((uint16_t)((b & 2) ? dw >> 16 : dw & 0xffffu)));
#pragma unroll
        for (int i = 0; i < 8; ++i) u.dsc[i] = d * (float)(int8_t)(sc[i >> 2] >> (8 * (i & 3)));
    }
    template <int K>
    static __device__ __forceinline__ float dot(const Unit& w, const int (&u)[8], float2 ds)
    {
        int s0 = 0, s1 = 0;
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            const uint32_t lo = (w.ql[8 * (K & 1) + m] >> (4 * (K >> 1))) & 0x0F0F0F0Fu;
            const uint32_t hi = ((w.qh[m] >> (2 * K)) & 0x03030303u) << 4;
            const int v = (int)__vsubss4(lo | hi, 0x20202020u);
            if (m < 4)
                s0 = __dp4a(v, u[m], s0);
            else
                s1 = __dp4a(v, u[m], s1);
        }
        return ds.x * (w.dsc[2 * K] * (float)s0 + w.dsc[2 * K + 1] * (float)s1);
    }
};

// ---- The product ------------------------------------------------------------------------
// An RMSNorm left to the product that reads its output (an experiment of
// scripts/cuda/matvec_bench.cu, not used by the production kernels): the kernel before wrote
// the Q8_1 blocks of v * w, unscaled, with each block's (scale, sum) in `side` and partial
// sums of squares of v in `part` (`nparts` of them); the product multiplies each block's
// (scale, sum) by the norm's rsqrt(sum / n + eps) as it copies the blocks in.
struct NormIn {
    const float2* side;
    const float* part;
    int nparts, n;
    float eps;
};

// Grid: ceil(nrows / (W * R)) CTAs of W warps, with the dynamic shared memory `smem_bytes`
// (`matvec.rs`) gives; the production kernels take CTA_ROWS rows a CTA. With NORM, one
// activation row whose blocks are normalized as `NormIn` says.
template <class F, int NCOLS, int W, int R, bool NORM = false>
__device__ __forceinline__ void matvec(const uint8_t* __restrict__ w,
                                       const uint8_t* __restrict__ y, float* __restrict__ dst,
                                       int ncols_x, int nrows_x, int stride_col_y,
                                       int stride_col_dst, NormIn norm = NormIn{})
{
    constexpr int ROW_U4 = PASS / 8 * F::G8 / 16;  // a row's pass of weights, 16-byte words
    constexpr int ACT_U4 = PASS * 36 / 16;
    extern __shared__ uint4 smem[];
    uint4* act = smem;                     // [NCOLS][ACT_U4]
    pdl_trigger();  // the kernel after this waits for this one before it reads anything
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    static_assert(!NORM || NCOLS == 1, "a normalized activation is one row");
    uint4* wts = smem + NCOLS * ACT_U4 + warp * R * ROW_U4;  // [R][ROW_U4]
    const int row0 = (blockIdx.x * W + warp) * R;
    const bool active = row0 < nrows_x;    // every warp takes part in the CTA's barriers
    const int nb = ncols_x / QK;
    const long long row_bytes = (long long)(nb / 8) * F::G8;
    const long long y_bytes = (long long)stride_col_y * 36;
    float acc[R][NCOLS];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < NCOLS; ++c) acc[r][c] = 0.0f;

    // This warp's rows of a pass, loaded into registers: the first pass before the wait, each
    // next one before the pass before it is computed, so that its loads are in flight during
    // that work (a CTA walks its passes one after the other, and matrices of a few thousand
    // rows leave too few CTAs to hide a pass's round trip otherwise).
    constexpr int PER_LANE = (ROW_U4 + 31) / 32;
    uint4 buf[R][PER_LANE];
    auto load_pass = [&](int kb) {
        const int wu4 = min(PASS, nb - kb) / 8 * F::G8 / 16;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const uint4* src = reinterpret_cast<const uint4*>(w + (row0 + r) * row_bytes +
                                                              (kb / 8) * (long long)F::G8);
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j) {
                const int i = lane + 32 * j;
                if (row0 + r < nrows_x && i < wu4) buf[r][j] = __ldcs(src + i);
            }
        }
    };
    if (active) load_pass(0);
    // The activations come from the kernel before: wait for it (a no-op where this kernel was
    // launched the ordinary way).
    pdl_wait();
    __shared__ float norm_scale;
    if (NORM) {
        // every CTA sums the partials in the same order, so all get the same scale
        if (warp == 0) {
            float t = 0.0f;
            for (int i = lane; i < norm.nparts; i += 32) t += norm.part[i];
            t = warp_sum(t);
            if (lane == 0) norm_scale = rsqrtf(t / (float)norm.n + norm.eps);
        }
        __syncthreads();
    }

    for (int kb = 0; kb < nb; kb += PASS) {
        const int cb = min(PASS, nb - kb);  // a multiple of 8 blocks
        // The activation rows' blocks of this pass, by the whole CTA.
        const int au4 = cb * 36 / 16;
        for (int i = threadIdx.x; i < NCOLS * au4; i += W * 32) {
            const int c = i / au4, o = i - c * au4;
            act[c * ACT_U4 + o] = reinterpret_cast<const uint4*>(y + c * y_bytes + kb * 36LL)[o];
        }
        if (NORM) {
            __syncthreads();
            for (int i = threadIdx.x; i < cb; i += W * 32) {
                const float2 ds = norm.side[kb + i];
                *reinterpret_cast<half2*>(reinterpret_cast<uint8_t*>(act) + i * 36) =
                    make_half2(__float2half(ds.x * norm_scale), __float2half(ds.y * norm_scale));
            }
        }
        if (active) {
            const int wu4 = cb / 8 * F::G8 / 16;
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int j = 0; j < PER_LANE; ++j) {
                    const int i = lane + 32 * j;
                    if (row0 + r < nrows_x && i < wu4) wts[r * ROW_U4 + i] = buf[r][j];
                }
        }
        __syncthreads();
        if (active && kb + PASS < nb) load_pass(kb + PASS);
        if (active && 4 * lane < cb) {
            // This lane's 128 values of each row.
            typename F::Unit g[R];
#pragma unroll
            for (int r = 0; r < R; ++r)
                F::load(reinterpret_cast<const uint8_t*>(wts + r * ROW_U4), lane, g[r]);
#pragma unroll
            for (int c = 0; c < NCOLS; ++c) {
                uint32_t a[36];
                const uint4* p = act + c * ACT_U4 + lane * 9;
#pragma unroll
                for (int i = 0; i < 9; ++i) {
                    const uint4 x = p[i];
                    a[4 * i] = x.x;
                    a[4 * i + 1] = x.y;
                    a[4 * i + 2] = x.z;
                    a[4 * i + 3] = x.w;
                }
                // Unrolled by hand so that the block index is a template argument.
#define MATVEC_BLOCK(K)                                                                        \
    {                                                                                          \
        const float2 ds = __half22float2(*reinterpret_cast<const half2*>(&a[9 * K]));          \
        int u[8];                                                                              \
        _Pragma("unroll") for (int m = 0; m < 8; ++m) u[m] = (int)a[9 * K + 1 + m];            \
        _Pragma("unroll") for (int r = 0; r < R; ++r) acc[r][c] += F::template dot<K>(g[r], u, ds); \
    }
                MATVEC_BLOCK(0)
                MATVEC_BLOCK(1)
                MATVEC_BLOCK(2)
                MATVEC_BLOCK(3)
#undef MATVEC_BLOCK
            }
        }
        __syncthreads();
    }

    if (!active) return;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int c = 0; c < NCOLS; ++c) {
            const float v = warp_sum(acc[r][c]);
            if (lane == 0 && row0 + r < nrows_x) dst[(long long)c * stride_col_dst + row0 + r] = v;
        }
    }
}

// W warps of R rows, and MINB, the CTAs a multiprocessor must hold (which caps the
// registers). For Q4_0 with one activation row (the decode case), 8 warps of one row, 4 CTAs:
// `scripts/cuda/matvec_bench.cu` timed the 8B model's products 5 % faster in a chain than
// with 4 warps of two rows, 5 CTAs (docs/benchmarks.md). For Q8_0 with one row, 4 warps of
// two, 4 CTAs fit without spilling (uncapped: 152 registers, 3 CTAs). The other formats take
// 8 warps of one row for one activation row, with 3 CTAs (their units hold up to 32 words
// and more fields to unpack), and every format 4 warps of two rows for more activation rows,
// with what registers they need. `matvec.rs` launches the same shapes.
#define MATVEC(name, F, NCOLS, W, R, MINB)                                                   \
    extern "C" __global__ void __launch_bounds__(W * 32, MINB)                                \
        name(const uint8_t* __restrict__ w, const uint8_t* __restrict__ y,                    \
             float* __restrict__ dst, int ncols_x, int nrows_x, int stride_col_y,             \
             int stride_col_dst)                                                              \
    {                                                                                         \
        static_assert(W * R == CTA_ROWS, "matvec.rs launches CTA_ROWS rows a CTA");          \
        matvec<F, NCOLS, W, R>(w, y, dst, ncols_x, nrows_x, stride_col_y, stride_col_dst);    \
    }

#define MATVEC_COLS(type, F, W1, R1, MINB1)         \
    MATVEC(matvec_##type##_c1, F, 1, W1, R1, MINB1) \
    MATVEC(matvec_##type##_c2, F, 2, 4, 2, 1)       \
    MATVEC(matvec_##type##_c3, F, 3, 4, 2, 1)       \
    MATVEC(matvec_##type##_c4, F, 4, 4, 2, 1)       \
    MATVEC(matvec_##type##_c5, F, 5, 4, 2, 1)       \
    MATVEC(matvec_##type##_c6, F, 6, 4, 2, 1)       \
    MATVEC(matvec_##type##_c7, F, 7, 4, 2, 1)       \
    MATVEC(matvec_##type##_c8, F, 8, 4, 2, 1)

MATVEC_COLS(q4_0, Q4_0, 8, 1, 4)
MATVEC_COLS(q4_1, Q4_1, 8, 1, 3)
MATVEC_COLS(q5_0, Q5_0, 8, 1, 3)
MATVEC_COLS(q5_1, Q5_1, 8, 1, 3)
MATVEC_COLS(q8_0, Q8_0, 4, 2, 4)
MATVEC_COLS(q4_k, Q4_K, 8, 1, 3)
MATVEC_COLS(q5_k, Q5_K, 8, 1, 3)
MATVEC_COLS(q6_k, Q6_K, 8, 1, 3)
