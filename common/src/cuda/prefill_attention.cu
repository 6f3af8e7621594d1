// Prefill attention on tensor cores, flash-attention style: the queries of a prompt chunk
// against one session's f16 key and value rows, without the [heads, n, keys] score matrix or
// a mask built on the host.
//
//   prefill_attention_hd{64,128,256}: grid (ceil(n / 64), heads), 4 warps. A CTA takes 64
//   query rows of one head; each warp 16 of them. For each tile of 64 keys the CTA may see,
//   it loads the keys and values into shared memory, and each warp computes its 16 x 64
//   scores (WMMA, f16 in, f32 out), masks them (causal, and the sliding window), updates its
//   rows' running max and sum (online softmax), rescales its rows of the f32 output and
//   adds P V (WMMA again, P in f16). Tiles past the last query, or before the first key the
//   window lets any of the CTA's queries see, are skipped.
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
