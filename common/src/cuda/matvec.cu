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
// Blocks a pass: one group of 4 per lane.
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

// One Q4_0 block against one Q8_1 block: the weights are (nibble - 8) * d.
__device__ __forceinline__ float dot(const int (&q)[4], float d, const int (&u)[8], float2 ds)
{
    int s = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        s = __dp4a(q[k] & 0x0F0F0F0F, u[k], s);
        s = __dp4a((q[k] >> 4) & 0x0F0F0F0F, u[k + 4], s);
    }
    return d * ((float)s * ds.x - 8.0f * ds.y);
}

// One Q8_0 block against one Q8_1 block.
__device__ __forceinline__ float dot(const int (&q)[8], float d, const int (&u)[8], float2 ds)
{
    int s = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) s = __dp4a(q[k], u[k], s);
    return d * ds.x * (float)s;
}

// Grid: ceil(nrows / CTA_ROWS) CTAs of W warps, with the dynamic shared memory `smem_bytes`
// (`matvec.rs`) gives.
template <int QW, int NCOLS, int W, int R>
__device__ __forceinline__ void matvec(const uint8_t* __restrict__ w,
                                       const uint8_t* __restrict__ y, float* __restrict__ dst,
                                       int ncols_x, int nrows_x, int stride_col_y,
                                       int stride_col_dst)
{
    constexpr int BYTES = 2 + 4 * QW;      // a weight block
    constexpr int GW = 4 * BYTES / 4;      // 32-bit words of a group of 4 weight blocks
    constexpr int ROW_U4 = PASS * BYTES / 16;
    constexpr int ACT_U4 = PASS * 36 / 16;
    extern __shared__ uint4 smem[];
    uint4* act = smem;                     // [NCOLS][ACT_U4]
    pdl_trigger();  // the kernel after this waits for this one before it reads anything
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    static_assert(W * R == CTA_ROWS, "a CTA takes CTA_ROWS rows");
    uint4* wts = smem + NCOLS * ACT_U4 + warp * R * ROW_U4;  // [R][ROW_U4]
    const int row0 = (blockIdx.x * W + warp) * R;
    const bool active = row0 < nrows_x;    // every warp takes part in the CTA's barriers
    const int nb = ncols_x / QK;
    const long long row_bytes = (long long)nb * BYTES;
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
        const int wu4 = min(PASS, nb - kb) * BYTES / 16;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const uint4* src =
                reinterpret_cast<const uint4*>(w + (row0 + r) * row_bytes + kb * (long long)BYTES);
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

    for (int kb = 0; kb < nb; kb += PASS) {
        const int cb = min(PASS, nb - kb);  // a multiple of 8 blocks
        // The activation rows' blocks of this pass, by the whole CTA.
        const int au4 = cb * 36 / 16;
        for (int i = threadIdx.x; i < NCOLS * au4; i += W * 32) {
            const int c = i / au4, o = i - c * au4;
            act[c * ACT_U4 + o] = reinterpret_cast<const uint4*>(y + c * y_bytes + kb * 36LL)[o];
        }
        if (active) {
            const int wu4 = cb * BYTES / 16;
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
            // This lane's group of 4 blocks of each row, as 32-bit words.
            uint32_t g[R][GW];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const uint2* p = reinterpret_cast<const uint2*>(
                    reinterpret_cast<const uint8_t*>(wts + r * ROW_U4) + lane * 4 * BYTES);
#pragma unroll
                for (int i = 0; i < GW / 2; ++i) {
                    const uint2 x = p[i];
                    g[r][2 * i] = x.x;
                    g[r][2 * i + 1] = x.y;
                }
            }
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
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const float2 ds = __half22float2(*reinterpret_cast<const half2*>(&a[9 * k]));
                    int u[8];
#pragma unroll
                    for (int m = 0; m < 8; ++m) u[m] = (int)a[9 * k + 1 + m];
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        int q[QW];
#pragma unroll
                        for (int m = 0; m < QW; ++m) q[m] = (int)word_at(g[r], k * BYTES + 2 + 4 * m);
                        acc[r][c] += dot(q, half_at(g[r], k * BYTES), u, ds);
                    }
                }
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
// two, 4 CTAs fit without spilling (uncapped: 152 registers, 3 CTAs). The other widths take
// 4 warps of two rows and what registers they need. `matvec.rs` launches the same shapes.
#define MATVEC(name, QW, NCOLS, W, R, MINB)                                                  \
    extern "C" __global__ void __launch_bounds__(W * 32, MINB)                                \
        name(const uint8_t* __restrict__ w, const uint8_t* __restrict__ y,                    \
             float* __restrict__ dst, int ncols_x, int nrows_x, int stride_col_y,             \
             int stride_col_dst)                                                              \
    {                                                                                         \
        matvec<QW, NCOLS, W, R>(w, y, dst, ncols_x, nrows_x, stride_col_y, stride_col_dst);   \
    }

#define MATVEC_COLS(type, QW, W1, R1, MINB1)         \
    MATVEC(matvec_##type##_c1, QW, 1, W1, R1, MINB1) \
    MATVEC(matvec_##type##_c2, QW, 2, 4, 2, 1)       \
    MATVEC(matvec_##type##_c3, QW, 3, 4, 2, 1)       \
    MATVEC(matvec_##type##_c4, QW, 4, 4, 2, 1)       \
    MATVEC(matvec_##type##_c5, QW, 5, 4, 2, 1)       \
    MATVEC(matvec_##type##_c6, QW, 6, 4, 2, 1)       \
    MATVEC(matvec_##type##_c7, QW, 7, 4, 2, 1)       \
    MATVEC(matvec_##type##_c8, QW, 8, 4, 2, 1)

MATVEC_COLS(q4_0, 4, 8, 1, 4)
MATVEC_COLS(q8_0, 8, 4, 2, 4)
