// Prefill attention on tensor cores, flash-attention style: the queries of a prompt chunk
// against one session's f16 key and value rows, without the [heads, n, keys] score matrix or
// a mask built on the host. Both kernels take, for one head, 64 query rows a CTA of 4 warps,
// 16 rows a warp, and walk the tiles of 64 keys the CTA may see: tiles past its last query, or
// before the first key the window lets any of its queries see, are skipped.
//
//   prefill_flash_hd{64,128} (sm_80 and later): everything a warp computes stays in its
//   registers. Its queries are loaded once as mma.sync operands; each tile's scores S = Q K^T
//   (m16n8k16, f16 in, f32 out) are masked only where the tile crosses the diagonal, the
//   window or the end of the keys, the online softmax runs on them in place, and their
//   probabilities become, with no trip through shared memory, the A operand of O += P V
//   (the accumulator layout of two 16 x 8 tiles is the operand layout of one 16 x 16). Keys
//   and values come through shared memory by cp.async, the next tile loading while this one
//   is used; ldmatrix (transposed for V) feeds the products. The CTAs with the most keys (the
//   last rows) start first.
//
//   prefill_attention_hd{64,128,256} (WMMA): S, P and O go through shared memory; it serves
//   heads of 256 (whose registers would not hold a warp's O and Q) and PTX built for sm_75
//   (the host falls back to candle's ops where its shared memory does not fit the device).
//
// Inputs: q [n, heads * hd] f32 (rotated); k and v [total, kv_heads * hd] f16, rows of
// positions lo .. lo + total; query i sits at position start + i and sees key j when
// lo + j <= start + i and start + i - (lo + j) < reach. Output [n, heads * hd] f32.
//
// Rounding: the queries (times 1/sqrt(hd)) and the probabilities go through f16, as in
// llama.cpp's flash attention; scores, softmax and the output accumulate in f32.
#include <cuda_fp16.h>
#include <mma.h>
#include <math_constants.h>

using namespace nvcuda;

#define BQ 64
#define BK 64
#define PA_WARPS 4

template <int D>
struct PaLayout {
    static constexpr int LDQ = D + 8;   // halves a row of Q, K, V (padding against bank conflicts)
    static constexpr int LDS = BK + 4;  // floats a row of S
    static constexpr int LDP = BK + 8;  // halves a row of P
    static constexpr int LDO = D + 4;   // floats a row of O
    static constexpr int Q_BYTES = BQ * LDQ * 2;
    static constexpr int KV_BYTES = BK * LDQ * 2;
    static constexpr int S_BYTES = BQ * LDS * 4;
    static constexpr int P_BYTES = BQ * LDP * 2;
    static constexpr int O_BYTES = BQ * LDO * 4;
    static constexpr int BYTES = Q_BYTES + 2 * KV_BYTES + S_BYTES + P_BYTES + O_BYTES;
};

template <int D>
__device__ __forceinline__ void prefill_attention(
    const float* __restrict__ q, long long q_stride,
    const __half* __restrict__ k, const __half* __restrict__ v, long long kv_stride,
    float* __restrict__ out, long long out_stride,
    int n, int total, int start, int lo, int reach, int heads, int kv_heads, float scale)
{
    using L = PaLayout<D>;
    extern __shared__ __align__(128) unsigned char smem[];
    __half* Qs = reinterpret_cast<__half*>(smem);
    __half* Ks = reinterpret_cast<__half*>(smem + L::Q_BYTES);
    __half* Vs = reinterpret_cast<__half*>(smem + L::Q_BYTES + L::KV_BYTES);
    float* S = reinterpret_cast<float*>(smem + L::Q_BYTES + 2 * L::KV_BYTES);
    __half* P = reinterpret_cast<__half*>(smem + L::Q_BYTES + 2 * L::KV_BYTES + L::S_BYTES);
    float* O = reinterpret_cast<float*>(smem + L::Q_BYTES + 2 * L::KV_BYTES + L::S_BYTES +
                                        L::P_BYTES);

    const int h = blockIdx.y;
    const int kvh = h / (heads / kv_heads);
    const int q0 = blockIdx.x * BQ;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int nthreads = 32 * PA_WARPS;

    // The queries, scaled, into f16; the output rows to zero.
    for (int i = tid; i < BQ * D; i += nthreads) {
        const int r = i / D, c = i % D;
        const float x = (q0 + r < n) ? q[(long long)(q0 + r) * q_stride + (long long)h * D + c] : 0.f;
        Qs[r * L::LDQ + c] = __float2half(x * scale);
        O[r * L::LDO + c] = 0.f;
    }

    // The keys any query of this CTA may see: [j_begin, j_end).
    const int last_row = min(n, q0 + BQ) - 1;
    const int j_end = min(total, start + last_row - lo + 1);
    int j_begin = 0;
    if (reach < 0x7fffffff) j_begin = max(0, start + q0 - reach + 1 - lo);

    // This lane's row of the warp's 16 and its half of the tile's columns.
    const int r = warp * 16 + lane / 2;
    const int half_ = lane % 2;
    const int qi = q0 + r;
    const int qa = start + qi;
    float m = -CUDART_INF_F, l = 0.f;

    constexpr int V8 = D / 8;  // 16-byte pieces a row
    for (int j0 = (j_begin / BK) * BK; j0 < j_end; j0 += BK) {
        __syncthreads();  // the previous tile is used up (and, the first time, Q is written)
        for (int i = tid; i < BK * V8; i += nthreads) {
            const int rr = i / V8, c8 = i % V8;
            uint4 kx = make_uint4(0, 0, 0, 0), vx = make_uint4(0, 0, 0, 0);
            if (j0 + rr < total) {
                const long long at = (long long)(j0 + rr) * kv_stride + (long long)kvh * D + c8 * 8;
                kx = *reinterpret_cast<const uint4*>(k + at);
                vx = *reinterpret_cast<const uint4*>(v + at);
            }
            *reinterpret_cast<uint4*>(Ks + rr * L::LDQ + c8 * 8) = kx;
            *reinterpret_cast<uint4*>(Vs + rr * L::LDQ + c8 * 8) = vx;
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 rows.
#pragma unroll
        for (int c = 0; c < BK / 16; ++c) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
                wmma::load_matrix_sync(a, Qs + warp * 16 * L::LDQ + kk * 16, L::LDQ);
                wmma::load_matrix_sync(b, Ks + c * 16 * L::LDQ + kk * 16, L::LDQ);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(S + warp * 16 * L::LDS + c * 16, acc, L::LDS,
                                    wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax over this lane's 32 columns of row r (two lanes a row).
        float s[BK / 2];
        float mx = -CUDART_INF_F;
#pragma unroll
        for (int c = 0; c < BK / 2; ++c) {
            const int j = j0 + half_ * (BK / 2) + c;
            const int ka = lo + j;
            const bool seen = qi < n && j < total && ka <= qa && qa - ka < reach;
            s[c] = seen ? S[r * L::LDS + half_ * (BK / 2) + c] : -CUDART_INF_F;
            mx = fmaxf(mx, s[c]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float m_new = fmaxf(m, mx);
        const float alpha = (m_new == -CUDART_INF_F) ? 1.f : __expf(m - m_new);
        float sum = 0.f;
#pragma unroll
        for (int c = 0; c < BK / 2; ++c) {
            const float p = (s[c] == -CUDART_INF_F) ? 0.f : __expf(s[c] - m_new);
            sum += p;
            P[r * L::LDP + half_ * (BK / 2) + c] = __float2half(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * alpha + sum;
        m = m_new;
        for (int c = half_ * (D / 2); c < (half_ + 1) * (D / 2); ++c) O[r * L::LDO + c] *= alpha;
        __syncwarp();

        // O += P V for this warp's 16 rows.
#pragma unroll
        for (int c = 0; c < D / 16; ++c) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, O + warp * 16 * L::LDO + c * 16, L::LDO,
                                   wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
                wmma::load_matrix_sync(a, P + warp * 16 * L::LDP + kk * 16, L::LDP);
                wmma::load_matrix_sync(b, Vs + kk * 16 * L::LDQ + c * 16, L::LDQ);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(O + warp * 16 * L::LDO + c * 16, acc, L::LDO,
                                    wmma::mem_row_major);
        }
        __syncwarp();
    }

    __syncthreads();
    if (qi < n) {
        const float inv = l > 0.f ? 1.f / l : 0.f;
        float* o = out + (long long)qi * out_stride + (long long)h * D;
        for (int c = half_ * (D / 2); c < (half_ + 1) * (D / 2); ++c) o[c] = O[r * L::LDO + c] * inv;
    }
}

#define PREFILL_ATTENTION(D)                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * PA_WARPS) prefill_attention_hd##D(      \
        const float* __restrict__ q, long long q_stride, const __half* __restrict__ k,         \
        const __half* __restrict__ v, long long kv_stride, float* __restrict__ out,            \
        long long out_stride, int n, int total, int start, int lo, int reach, int heads,       \
        int kv_heads, float scale)                                                             \
    {                                                                                          \
        prefill_attention<D>(q, q_stride, k, v, kv_stride, out, out_stride, n, total, start,   \
                             lo, reach, heads, kv_heads, scale);                               \
    }

PREFILL_ATTENTION(64)
PREFILL_ATTENTION(128)
PREFILL_ATTENTION(256)

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800

template <int D>
struct FaLayout {
    static constexpr int LD = D + 8;      // halves a row of a K or V tile (16-byte rows that
                                          // ldmatrix reads without bank conflicts)
    static constexpr int TILE = BK * LD;  // halves a tile
    static constexpr int BYTES = 2 * 2 * TILE * 2;  // two stages of K and V
};

__device__ __forceinline__ unsigned shared_address(const void* p)
{
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes from global to shared memory, asynchronously; zeros when !valid.
__device__ __forceinline__ void copy16_async(void* dst, const void* src, bool valid)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
                 "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const __half* p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const __half* p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p)));
}

// c += a b for a 16 x 16 f16 A (row major), a 16 x 8 f16 B (column major), f32 C.
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                          unsigned b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as the halves of one register, the first in the low half.
__device__ __forceinline__ unsigned pack_halves(float lo, float hi)
{
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
}

__device__ __forceinline__ float exp2_approx(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

template <int D>
__device__ __forceinline__ void prefill_flash(
    const float* __restrict__ q, long long q_stride,
    const __half* __restrict__ k, const __half* __restrict__ v, long long kv_stride,
    float* __restrict__ out, long long out_stride,
    int n, int total, int start, int lo, int reach, int heads, int kv_heads, float scale)
{
    using L = FaLayout<D>;
    extern __shared__ __align__(128) unsigned char smem[];
    __half* tiles = reinterpret_cast<__half*>(smem);  // [stage][K, V][BK][LD]

    const int h = blockIdx.y;
    const int kvh = h / (heads / kv_heads);
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4;  // this lane's rows g and g + 8, columns 2t, 2t + 1
    const int w0 = q0 + warp * 16;         // the warp's first row

    // The warp's queries, scaled, as the A operands of S = Q K^T: qf[kk] covers head values
    // 16 kk .. 16 kk + 15 of rows w0 .. w0 + 15.
    unsigned qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int part = 0; part < 4; ++part) {
            const int row = w0 + g + (part % 2) * 8;
            const int col = kk * 16 + (part / 2) * 8 + 2 * t;
            float x0 = 0.f, x1 = 0.f;
            if (row < n) {
                const float* at = q + (long long)row * q_stride + (long long)h * D + col;
                x0 = at[0] * scale;
                x1 = at[1] * scale;
            }
            qf[kk][part] = pack_halves(x0, x1);
        }
    }

    // The keys any query of this CTA may see: [j_begin, j_end), in tiles [t_begin, t_end).
    const int last_row = min(n, q0 + BQ) - 1;
    const int j_end = min(total, start + last_row - lo + 1);
    int j_begin = 0;
    if (reach < 0x7fffffff) j_begin = max(0, start + q0 - reach + 1 - lo);
    const int t_begin = j_begin / BK, t_end = (j_end + BK - 1) / BK;

    constexpr int V8 = D / 8;  // 16-byte pieces a row
    auto load_tile = [&](int tile, int stage) {
        const int j0 = tile * BK;
        __half* ks = tiles + stage * 2 * L::TILE;
        __half* vs = ks + L::TILE;
        for (int i = tid; i < BK * V8; i += 32 * PA_WARPS) {
            const int rr = i / V8, c8 = i % V8;
            const bool ok = j0 + rr < total;
            const long long at =
                (long long)(ok ? j0 + rr : 0) * kv_stride + (long long)kvh * D + c8 * 8;
            copy16_async(ks + rr * L::LD + c8 * 8, k + at, ok);
            copy16_async(vs + rr * L::LD + c8 * 8, v + at, ok);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };

    float o[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
    float m[2] = {-CUDART_INF_F, -CUDART_INF_F};  // rows g, g + 8: running max, in log2 units
    float l[2] = {0.f, 0.f};                      // and this lane's part of the running sum
    const int qa = start + w0 + g;                // the position of row g
    constexpr float LOG2E = 1.4426950408889634f;

    if (t_begin < t_end) load_tile(t_begin, 0);
    for (int tile = t_begin; tile < t_end; ++tile) {
        const int stage = (tile - t_begin) % 2;
        if (tile + 1 < t_end) {
            load_tile(tile + 1, stage ^ 1);
            asm volatile("cp.async.wait_group 1;\n" ::);
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::);
        }
        __syncthreads();  // this tile is in shared memory for every warp

        const int j0 = tile * BK;
        const int ka0 = lo + j0;  // the tile's first key position
        // Nothing for this warp when its rows are all past the chunk's, when the tile's first
        // key comes after its last row, or when its last key is out of the window of its first
        // row.
        const bool idle = w0 >= n || ka0 > qa + 15 - g ||
                          (reach < 0x7fffffff && qa - g - (ka0 + BK - 1) >= reach);
        if (!idle) {
            const __half* ks = tiles + stage * 2 * L::TILE;
            const __half* vs = ks + L::TILE;

            float s[BK / 8][4];
#pragma unroll
            for (int nt = 0; nt < BK / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
                for (int np = 0; np < BK / 16; ++np) {
                    // keys 16 np .. + 15 against head values 16 kk .. + 15: the B operands
                    // of two 8-key tiles
                    unsigned b[4];
                    ldmatrix_x4(b, ks + (np * 16 + (lane / 16) * 8 + lane % 8) * L::LD +
                                       kk * 16 + ((lane / 8) % 2) * 8);
                    mma_16816(s[2 * np], qf[kk], b[0], b[1]);
                    mma_16816(s[2 * np + 1], qf[kk], b[2], b[3]);
                }
            }

            // The mask, only on tiles that cross the diagonal, the window or the last key.
            const bool masked = ka0 + BK - 1 > qa - g || j0 + BK > total ||
                                (reach < 0x7fffffff && qa + 15 - g - ka0 >= reach);
            if (masked) {
#pragma unroll
                for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int j = j0 + nt * 8 + 2 * t + e % 2;
                        const int ka = lo + j;
                        const int qe = qa + (e / 2) * 8;
                        if (!(j < total && ka <= qe && qe - ka < reach)) s[nt][e] = -CUDART_INF_F;
                    }
                }
            }

            // Online softmax of rows g and g + 8 (the four lanes of a quad share a row).
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = -CUDART_INF_F;
#pragma unroll
                for (int nt = 0; nt < BK / 8; ++nt)
                    mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m[r], mx * LOG2E);
                // all masked so far: nothing to rescale, and every probability 0
                const float alpha = m_new == -CUDART_INF_F ? 1.f : exp2_approx(m[r] - m_new);
                const float base = m_new == -CUDART_INF_F ? 0.f : m_new;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
                    for (int e = 2 * r; e < 2 * r + 2; ++e) {
                        const float p = exp2_approx(fmaf(s[nt][e], LOG2E, -base));
                        s[nt][e] = p;
                        sum += p;
                    }
                }
                l[r] = l[r] * alpha + sum;
                m[r] = m_new;
#pragma unroll
                for (int dn = 0; dn < D / 8; ++dn) {
                    o[dn][2 * r] *= alpha;
                    o[dn][2 * r + 1] *= alpha;
                }
            }

            // O += P V: the probabilities of 8-key tiles 2 kk and 2 kk + 1 are the A operand
            // of keys 16 kk .. + 15.
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                const unsigned pa[4] = {
                    pack_halves(s[2 * kk][0], s[2 * kk][1]),
                    pack_halves(s[2 * kk][2], s[2 * kk][3]),
                    pack_halves(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                    pack_halves(s[2 * kk + 1][2], s[2 * kk + 1][3]),
                };
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    // keys 16 kk .. + 15 against head values 16 dp .. + 15, transposed: the
                    // B operands of two 8-value tiles
                    unsigned b[4];
                    ldmatrix_x4_trans(b, vs + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * L::LD +
                                             dp * 16 + (lane / 16) * 8);
                    mma_16816(o[2 * dp], pa, b[0], b[1]);
                    mma_16816(o[2 * dp + 1], pa, b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before it is loaded again
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const int row = w0 + g + r * 8;
        if (row < n) {
            float* at = out + (long long)row * out_stride + (long long)h * D + 2 * t;
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                at[dn * 8] = o[dn][2 * r] * inv;
                at[dn * 8 + 1] = o[dn][2 * r + 1] * inv;
            }
        }
    }
}

#define PREFILL_FLASH(D)                                                                       \
    extern "C" __global__ void __launch_bounds__(32 * PA_WARPS) prefill_flash_hd##D(          \
        const float* __restrict__ q, long long q_stride, const __half* __restrict__ k,         \
        const __half* __restrict__ v, long long kv_stride, float* __restrict__ out,            \
        long long out_stride, int n, int total, int start, int lo, int reach, int heads,       \
        int kv_heads, float scale)                                                             \
    {                                                                                          \
        prefill_flash<D>(q, q_stride, k, v, kv_stride, out, out_stride, n, total, start, lo,   \
                         reach, heads, kv_heads, scale);                                       \
    }

PREFILL_FLASH(64)
PREFILL_FLASH(128)

#endif
