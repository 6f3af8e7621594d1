// Times the decode matrix-vector kernel (`common/src/cuda/matvec.cu`) and variants of it on
// the 8B model's product shapes, on the GPU machine, with no model and no Rust:
//
//   scripts/cuda/build-matvec-bench.sh           # here: nvcc from build-cuda.sh's tools
//   .gpu/mb/matvec-bench [--quick]                # there
//
// Each variant of the product (G: the kernel's loop with other warp/row shapes and K split
// over CTAs; A: weights copied to shared memory with cp.async, several passes in flight)
// runs every shape back to back, launched as the fused decode path launches them
// (programmatic stream serialization, so each launch may start loading its weights while the
// one before still runs), cycling over copies of the weight that together exceed the L2
// cache; then a chain of 32 layers of the four products, each layer's own weights (3.9 GB).
// Last, the whole fused decode step of one session (the kernels of fused_decode.cu and
// decode_attention.cu between the products) at two cache depths, with attention variants
// and with each kind of small kernel left out in turn, to show what each costs. Bandwidth is
// weight bytes over time; the copy bandwidth printed first is the roofline's.
#include "../../common/src/cuda/matvec.cu"
#include "../../common/src/cuda/decode_attention.cu"
#include "../../common/src/cuda/fused_decode.cu"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <chrono>
#include <vector>

#define CK(x)                                                                             \
    do {                                                                                  \
        cudaError_t e_ = (x);                                                             \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

// ---- Variant G: the kernel of matvec.cu with warps, rows and K splits as parameters. -----
// S > 1 splits each row's blocks into S ranges (grid.y), each CTA adding its partial sum
// with atomicAdd.
template <int QW, int W, int R, int S>
__device__ __forceinline__ void mv_g(const uint8_t* __restrict__ w, const uint8_t* __restrict__ y,
                                     float* __restrict__ dst, int ncols_x, int nrows_x)
{
    constexpr int BYTES = 2 + 4 * QW;
    constexpr int GW = 4 * BYTES / 4;
    constexpr int ROW_U4 = PASS * BYTES / 16;
    constexpr int ACT_U4 = PASS * 36 / 16;
    extern __shared__ uint4 smem[];
    uint4* act = smem;
    pdl_trigger();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint4* wts = smem + ACT_U4 + warp * R * ROW_U4;
    const int row0 = (blockIdx.x * W + warp) * R;
    const bool active = row0 < nrows_x;
    const int nb = ncols_x / QK;
    // This CTA's blocks [b0, b1): whole groups of 8.
    const int per = ((nb / 8 + S - 1) / S) * 8;
    const int b0 = min(nb, (int)blockIdx.y * per), b1 = min(nb, b0 + per);
    const long long row_bytes = (long long)nb * BYTES;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    constexpr int PER_LANE = (ROW_U4 + 31) / 32;
    uint4 buf[R][PER_LANE];
    auto load_pass = [&](int kb) {
        const int wu4 = min(PASS, b1 - kb) * BYTES / 16;
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
    if (active && b0 < b1) load_pass(b0);
    pdl_wait();
    for (int kb = b0; kb < b1; kb += PASS) {
        const int cb = min(PASS, b1 - kb);
        const int au4 = cb * 36 / 16;
        for (int i = threadIdx.x; i < au4; i += W * 32)
            act[i] = reinterpret_cast<const uint4*>(y + kb * 36LL)[i];
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
        if (active && kb + PASS < b1) load_pass(kb + PASS);
        if (active && 4 * lane < cb) {
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
            uint32_t a[36];
            const uint4* p = act + lane * 9;
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
                    acc[r] += dot(q, half_at(g[r], k * BYTES), u, ds);
                }
            }
        }
        __syncthreads();
    }
    if (!active) return;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const float v = warp_sum(acc[r]);
        if (lane == 0 && row0 + r < nrows_x) {
            if (S == 1)
                dst[row0 + r] = v;
            else
                atomicAdd(dst + row0 + r, v);
        }
    }
}

#define G(name, QW, W, R, S, MINB)                                                        \
    extern "C" __global__ void __launch_bounds__(W * 32, MINB)                            \
        name(const uint8_t* __restrict__ w, const uint8_t* __restrict__ y,                \
             float* __restrict__ dst, int ncols_x, int nrows_x, int, int)                 \
    {                                                                                     \
        mv_g<QW, W, R, S>(w, y, dst, ncols_x, nrows_x);                                   \
    }

G(g_4x2_s1, 4, 4, 2, 1, 5)
G(g_4x1_s1, 4, 4, 1, 1, 8)
G(g_8x1_s1, 4, 8, 1, 1, 4)
G(g_4x2_s2, 4, 4, 2, 2, 5)
G(g_4x1_s2, 4, 4, 1, 2, 8)
G(g_4x2_s4, 4, 4, 2, 4, 5)

// ---- Variant A: weights copied to shared memory with cp.async, STAGES passes in flight. ----
// No registers hold weights in flight, so a CTA keeps STAGES - 1 passes of loads outstanding
// while it computes one. The activation row is copied whole after the wait (K <= 16384).
__device__ __forceinline__ void cp16(void* smem_dst, const void* src)
{
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <int QW, int W, int R, int P, int STAGES>
__device__ __forceinline__ void mv_a(const uint8_t* __restrict__ w, const uint8_t* __restrict__ y,
                                     float* __restrict__ dst, int ncols_x, int nrows_x)
{
    constexpr int BYTES = 2 + 4 * QW;
    constexpr int ROW_U4 = P * BYTES / 16;           // one row's pass
    constexpr int STAGE_U4 = W * R * ROW_U4;         // a CTA's pass
    constexpr int LANE_BLOCKS = P / 32;              // blocks a lane takes a pass (4 or 2)
    extern __shared__ uint4 smem[];
    uint4* wts = smem;                               // [STAGES][W * R][ROW_U4]
    uint4* act = smem + STAGES * STAGE_U4;           // [nb * 36 / 16]
    pdl_trigger();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = (blockIdx.x * W + warp) * R;
    const bool active = row0 < nrows_x;
    const int nb = ncols_x / QK;
    const int passes = (nb + P - 1) / P;
    const long long row_bytes = (long long)nb * BYTES;
    auto issue = [&](int p) {
        if (p < passes && active) {
            const int kb = p * P;
            const int wu4 = min(P, nb - kb) * BYTES / 16;
            uint4* st = wts + (p % STAGES) * STAGE_U4 + warp * R * ROW_U4;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (row0 + r >= nrows_x) break;
                const uint4* src = reinterpret_cast<const uint4*>(w + (row0 + r) * row_bytes +
                                                                  kb * (long long)BYTES);
                for (int i = lane; i < wu4; i += 32) cp16(st + r * ROW_U4 + i, src + i);
            }
        }
        cp_commit();  // an empty group where there is nothing left, so counts stay aligned
    };
#pragma unroll
    for (int p = 0; p < STAGES - 1; ++p) issue(p);
    pdl_wait();
    {
        const int au4 = nb * 36 / 16;
        const uint4* src = reinterpret_cast<const uint4*>(y);
        for (int i = threadIdx.x; i < au4; i += W * 32) act[i] = src[i];
    }
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    for (int p = 0; p < passes; ++p) {
        cp_wait<STAGES - 2>();
        __syncthreads();
        issue(p + STAGES - 1);
        const int kb = p * P;
        const int cb = min(P, nb - kb);
        if (active && LANE_BLOCKS * lane < cb) {
            const uint4* st = wts + (p % STAGES) * STAGE_U4 + warp * R * ROW_U4;
            // This lane's group of GB blocks of each row, then of the activation.
            constexpr int GB = LANE_BLOCKS;
            constexpr int GWN = GB * BYTES / 4;
            uint32_t g[R][GWN];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const uint8_t* base =
                    reinterpret_cast<const uint8_t*>(st + r * ROW_U4) + lane * GB * BYTES;
                if constexpr (GB * BYTES % 8 == 0) {
                    const uint2* p2 = reinterpret_cast<const uint2*>(base);
#pragma unroll
                    for (int i = 0; i < GWN / 2; ++i) {
                        const uint2 x = p2[i];
                        g[r][2 * i] = x.x;
                        g[r][2 * i + 1] = x.y;
                    }
                } else {
                    const uint32_t* p32 = reinterpret_cast<const uint32_t*>(base);
#pragma unroll
                    for (int i = 0; i < GWN; ++i) g[r][i] = p32[i];
                }
            }
            uint32_t a[9 * GB];
            const uint8_t* abase = reinterpret_cast<const uint8_t*>(act) + (kb + lane * GB) * 36;
            if constexpr (GB * 36 % 16 == 0) {
                const uint4* p4 = reinterpret_cast<const uint4*>(abase);
#pragma unroll
                for (int i = 0; i < 9 * GB / 4; ++i) {
                    const uint4 x = p4[i];
                    a[4 * i] = x.x;
                    a[4 * i + 1] = x.y;
                    a[4 * i + 2] = x.z;
                    a[4 * i + 3] = x.w;
                }
            } else {
                const uint2* p2 = reinterpret_cast<const uint2*>(abase);
#pragma unroll
                for (int i = 0; i < 9 * GB / 2; ++i) {
                    const uint2 x = p2[i];
                    a[2 * i] = x.x;
                    a[2 * i + 1] = x.y;
                }
            }
#pragma unroll
            for (int k = 0; k < GB; ++k) {
                const float2 ds = __half22float2(*reinterpret_cast<const half2*>(&a[9 * k]));
                int u[8];
#pragma unroll
                for (int m = 0; m < 8; ++m) u[m] = (int)a[9 * k + 1 + m];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    int q[QW];
#pragma unroll
                    for (int m = 0; m < QW; ++m) q[m] = (int)word_at(g[r], k * BYTES + 2 + 4 * m);
                    acc[r] += dot(q, half_at(g[r], k * BYTES), u, ds);
                }
            }
        }
    }
    cp_wait<0>();
    if (!active) return;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const float v = warp_sum(acc[r]);
        if (lane == 0 && row0 + r < nrows_x) dst[row0 + r] = v;
    }
}

#define A(name, QW, W, R, P, STAGES, MINB)                                                \
    extern "C" __global__ void __launch_bounds__(W * 32, MINB)                            \
        name(const uint8_t* __restrict__ w, const uint8_t* __restrict__ y,                \
             float* __restrict__ dst, int ncols_x, int nrows_x, int, int)                 \
    {                                                                                     \
        mv_a<QW, W, R, P, STAGES>(w, y, dst, ncols_x, nrows_x);                           \
    }

A(a_4x2_p128_s2, 4, 4, 2, 128, 2, 4)
A(a_4x2_p128_s3, 4, 4, 2, 128, 3, 3)
A(a_4x2_p64_s4, 4, 4, 2, 64, 4, 4)
A(a_4x1_p128_s3, 4, 4, 1, 128, 3, 5)
A(a_8x1_p64_s4, 4, 8, 1, 64, 4, 3)

// ---- Attention variant: W warps, R rows a warp per iteration (all R rows' keys and values
// loaded before any is used). ----
template <int W, int R>
__device__ __forceinline__ void attn_r(const float* __restrict__ q,
                                       const unsigned long long* __restrict__ ptrs,
                                       const int* __restrict__ pos, float* __restrict__ out,
                                       block_q8_1* __restrict__ out_q8, int out_q8_stride,
                                       int sessions, int heads, int kv_heads, int hd, float scale)
{
    pdl_trigger();
    pdl_wait();
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
    for (int j0 = warp * R; j0 < len; j0 += W * R) {
        float kx[R][PER], vx[R][PER];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int j = min(j0 + r, len - 1);
            const __half* kj = kb + (long long)j * kvw;
            const __half* vj = vb + (long long)j * kvw;
#pragma unroll
            for (int e = 0; e < PER; e++) {
                const int d = lane + 32 * e;
                kx[r][e] = d < hd ? __half2float(kj[d]) : 0.f;
                vx[r][e] = d < hd ? __half2float(vj[d]) : 0.f;
            }
        }
        float sc[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            sc[r] = 0.f;
#pragma unroll
            for (int e = 0; e < PER; e++) sc[r] += qv[e] * kx[r][e];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int r = 0; r < R; ++r) sc[r] += __shfl_xor_sync(0xffffffff, sc[r], o);
        float mn = m;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            sc[r] = j0 + r < len ? sc[r] * scale : -CUDART_INF_F;
            mn = fmaxf(mn, sc[r]);
        }
        const float cor = expf(m - mn);
        float p[R];
        l *= cor;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            p[r] = j0 + r < len ? expf(sc[r] - mn) : 0.f;
            l += p[r];
        }
#pragma unroll
        for (int e = 0; e < PER; e++) {
            float a = acc[e] * cor;
#pragma unroll
            for (int r = 0; r < R; ++r) a += p[r] * vx[r][e];
            acc[e] = a;
        }
        m = mn;
    }
    __shared__ float sm[W], sl[W];
    __shared__ float sacc[W][MAX_HD];
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
    for (int w = 0; w < W; w++) mx = fmaxf(mx, sm[w]);
    float total = 0.f;
    for (int w = 0; w < W; w++) total += sm[w] == -CUDART_INF_F ? 0.f : sl[w] * expf(sm[w] - mx);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < W; w++)
            a += sm[w] == -CUDART_INF_F ? 0.f : sacc[w][d] * expf(sm[w] - mx);
        a /= total;
        if (out != nullptr) {
            out[(long long)b * heads * hd + h * hd + d] = a;
        } else {
            quantize_block(a, out_q8 + (long long)b * out_q8_stride + (h * hd + d - lane) / QK,
                           lane);
        }
    }
}
#define ATTN_R(name, W, R)                                                                  \
    extern "C" __global__ void __launch_bounds__(W * 32) name(                              \
        const float* __restrict__ q, const unsigned long long* __restrict__ ptrs,           \
        const int* __restrict__ pos, float* __restrict__ out,                               \
        block_q8_1* __restrict__ out_q8, int out_q8_stride, float*, unsigned*, int sessions, \
        int heads, int kv_heads, int hd, float scale)                                       \
    {                                                                                       \
        attn_r<W, R>(q, ptrs, pos, out, out_q8, out_q8_stride, sessions, heads, kv_heads, hd, \
                     scale);                                                                \
    }
ATTN_R(attn_w8_r2, 8, 2)
ATTN_R(attn_w8_r4, 8, 4)
ATTN_R(attn_w16_r2, 16, 2)
ATTN_R(attn_w16_r4, 16, 4)
ATTN_R(attn_w32_r2, 32, 2)
ATTN_R(attn_w32_r4, 32, 4)

// ---- Host ------------------------------------------------------------------------------
typedef void (*Kernel)(const uint8_t*, const uint8_t*, float*, int, int, int, int);

struct Variant {
    const char* name;
    Kernel k;
    int rows_per_cta, threads, splits;
    // shared memory for a width of `cols` values
    size_t (*smem)(int cols);
};

static size_t smem_cur(int) { return PASS * 36 + CTA_ROWS * PASS * 18; }
static size_t smem_g2(int) { return PASS * 36 + 8 * PASS * 18; }
static size_t smem_g1(int) { return PASS * 36 + 4 * PASS * 18; }
static size_t act_whole(int cols) { return (size_t)cols / 32 * 36; }
static size_t smem_a_4x2_128_2(int c) { return 2 * 8 * 128 * 18 + act_whole(c); }
static size_t smem_a_4x2_128_3(int c) { return 3 * 8 * 128 * 18 + act_whole(c); }
static size_t smem_a_4x2_64_4(int c) { return 4 * 8 * 64 * 18 + act_whole(c); }
static size_t smem_a_4x1_128_3(int c) { return 3 * 4 * 128 * 18 + act_whole(c); }
static size_t smem_a_8x1_64_4(int c) { return 4 * 8 * 64 * 18 + act_whole(c); }

struct Shape {
    const char* name;
    int rows, cols;
};

static void launch(const Variant& v, const uint8_t* w, const uint8_t* y, float* dst, int rows,
                   int cols, cudaStream_t s, bool pdl)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((rows + v.rows_per_cta - 1) / v.rows_per_cta, v.splits, 1);
    cfg.blockDim = dim3(v.threads, 1, 1);
    cfg.dynamicSmemBytes = v.smem(cols);
    cfg.stream = s;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    int sy = (cols + 511) / 512 * 16;
    CK(cudaLaunchKernelEx(&cfg, v.k, w, y, dst, cols, rows, sy, rows));
}

__global__ void fill(uint8_t* p, size_t n, uint32_t seed)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t x = (uint32_t)i * 2654435761u ^ seed;
        x ^= x >> 13;
        x *= 0x5bd1e995;
        x ^= x >> 15;
        p[i] = (uint8_t)x;
    }
}

__global__ void fill_half(half* p, size_t n, float salt)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = __float2half(sinf(i * 0.37f + salt) * 1.3f);
}

// Q4_0 blocks with a small positive scale, Q8_1 blocks with valid halves.
__global__ void fix_scales(uint8_t* p, size_t blocks, int bytes, int which)
{
    for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < blocks;
         b += (size_t)gridDim.x * blockDim.x) {
        half* h = reinterpret_cast<half*>(p + b * bytes);
        h[0] = __float2half(0.01f);
        if (which == 1) h[1] = __float2half(0.5f);
    }
}

int main(int argc, char** argv)
{
    bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    int dev = 0;
    CK(cudaSetDevice(dev));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, dev));
    printf("device: %s, %d SMs, L2 %d MiB\n", prop.name, prop.multiProcessorCount,
           prop.l2CacheSize >> 20);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));

    // Copy bandwidth, as gpu_check.py measures it (read + write).
    {
        size_t n = 1ull << 30;
        uint8_t *a, *b;
        CK(cudaMalloc(&a, n));
        CK(cudaMalloc(&b, n));
        CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, s));
        CK(cudaEventRecord(e0, s));
        for (int i = 0; i < 20; ++i) CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, s));
        CK(cudaEventRecord(e1, s));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        printf("copy bandwidth: %.1f GB/s\n", 2.0 * 20 * n / (ms * 1e-3) / 1e9);
        CK(cudaFree(a));
        CK(cudaFree(b));
    }

    std::vector<Variant> vs = {
        {"current", matvec_q4_0_c1, CTA_ROWS, 256, 1, smem_cur},
        {"g 4x2", g_4x2_s1, 8, 128, 1, smem_g2},
        {"g 4x1", g_4x1_s1, 4, 128, 1, smem_g1},
        {"g 8x1", g_8x1_s1, 8, 256, 1, smem_g2},
        {"g 4x2 split2", g_4x2_s2, 8, 128, 2, smem_g2},
        {"g 4x1 split2", g_4x1_s2, 4, 128, 2, smem_g1},
        {"g 4x2 split4", g_4x2_s4, 8, 128, 4, smem_g2},
        {"a 4x2 p128 s2", a_4x2_p128_s2, 8, 128, 1, smem_a_4x2_128_2},
        {"a 4x2 p128 s3", a_4x2_p128_s3, 8, 128, 1, smem_a_4x2_128_3},
        {"a 4x2 p64 s4", a_4x2_p64_s4, 8, 128, 1, smem_a_4x2_64_4},
        {"a 4x1 p128 s3", a_4x1_p128_s3, 4, 128, 1, smem_a_4x1_128_3},
        {"a 8x1 p64 s4", a_8x1_p64_s4, 8, 256, 1, smem_a_8x1_64_4},
    };
    std::vector<Shape> shapes = {
        {"qkv", 6144, 4096}, {"o", 4096, 4096}, {"gate_up", 28672, 4096}, {"down", 4096, 14336}};
    for (auto& v : vs) {
        size_t most = 0;
        for (auto& sh : shapes) most = std::max(most, v.smem(sh.cols));
        CK(cudaFuncSetAttribute(v.k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)most));
        int blocks = 0;
        CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, v.k, v.threads,
                                                         v.smem(4096)));
        cudaFuncAttributes fa;
        CK(cudaFuncGetAttributes(&fa, v.k));
        printf("variant %-14s: %3d regs, %zu B smem (K 4096), %d CTAs an SM\n", v.name,
               fa.numRegs, v.smem(4096), blocks);
    }

    // Activations: Q8_1 rows for the widest K.
    const int kmax = 14336;
    const size_t ybytes = (size_t)(kmax + 511) / 512 * 16 * 36;
    uint8_t* y;
    CK(cudaMalloc(&y, ybytes));
    fill<<<256, 256, 0, s>>>(y, ybytes, 7);
    fix_scales<<<256, 256, 0, s>>>(y, ybytes / 36, 36, 1);
    float* dst;
    CK(cudaMalloc(&dst, 32 * 28672 * sizeof(float)));
    float* ref;
    CK(cudaMalloc(&ref, 28672 * sizeof(float)));

    // Isolated shapes: copies of the weight that together exceed 256 MB.
    printf("\nisolated (us a launch, GB/s of weights), %s launches\n", "PDL");
    printf("%-14s", "variant");
    for (auto& sh : shapes) printf(" | %-20s", sh.name);
    printf("\n");
    std::vector<std::vector<uint8_t*>> ws(shapes.size());
    for (size_t i = 0; i < shapes.size(); ++i) {
        size_t bytes = (size_t)shapes[i].rows * shapes[i].cols / 32 * 18;
        int copies = (int)((256ull << 20) / bytes) + 1;
        for (int c = 0; c < copies; ++c) {
            uint8_t* p;
            CK(cudaMalloc(&p, bytes));
            fill<<<1024, 256, 0, s>>>(p, bytes, 11 + c);
            fix_scales<<<1024, 256, 0, s>>>(p, bytes / 18, 18, 0);
            ws[i].push_back(p);
        }
    }
    CK(cudaStreamSynchronize(s));
    const int iters = quick ? 100 : 400;
    for (auto& v : vs) {
        printf("%-14s", v.name);
        for (size_t i = 0; i < shapes.size(); ++i) {
            const Shape& sh = shapes[i];
            // Correctness against the current kernel (split variants accumulate: zero first).
            CK(cudaMemsetAsync(ref, 0, sh.rows * 4, s));
            launch(vs[0], ws[i][0], y, ref, sh.rows, sh.cols, s, false);
            CK(cudaMemsetAsync(dst, 0, sh.rows * 4, s));
            launch(v, ws[i][0], y, dst, sh.rows, sh.cols, s, false);
            std::vector<float> a(sh.rows), b(sh.rows);
            CK(cudaMemcpyAsync(a.data(), ref, sh.rows * 4, cudaMemcpyDeviceToHost, s));
            CK(cudaMemcpyAsync(b.data(), dst, sh.rows * 4, cudaMemcpyDeviceToHost, s));
            CK(cudaStreamSynchronize(s));
            double worst = 0, mag = 0;
            for (int r = 0; r < sh.rows; ++r) {
                worst = std::max(worst, (double)fabsf(a[r] - b[r]));
                mag = std::max(mag, (double)fabsf(a[r]));
            }
            const bool ok = worst <= 1e-4 * mag + 1e-6;
            size_t bytes = (size_t)sh.rows * sh.cols / 32 * 18;
            const int nc = (int)ws[i].size();
            for (int it = 0; it < 20; ++it)
                launch(v, ws[i][it % nc], y, dst, sh.rows, sh.cols, s, true);
            CK(cudaEventRecord(e0, s));
            for (int it = 0; it < iters; ++it)
                launch(v, ws[i][it % nc], y, dst, sh.rows, sh.cols, s, true);
            CK(cudaEventRecord(e1, s));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            const double us = ms * 1e3 / iters;
            printf(" | %6.2f %6.0f %s", us, bytes / (us * 1e-6) / 1e9, ok ? "ok   " : "WRONG");
        }
        printf("\n");
        fflush(stdout);
    }
    for (auto& c : ws)
        for (auto p : c) CK(cudaFree(p));

    // The chain: 32 layers x (qkv, o, gate_up, down), each layer's own weights.
    const int layers = 32;
    std::vector<uint8_t*> lw;
    size_t total = 0;
    for (int l = 0; l < layers; ++l)
        for (auto& sh : shapes) {
            size_t bytes = (size_t)sh.rows * sh.cols / 32 * 18;
            uint8_t* p;
            CK(cudaMalloc(&p, bytes));
            fill<<<1024, 256, 0, s>>>(p, bytes, 100 + l);
            fix_scales<<<1024, 256, 0, s>>>(p, bytes / 18, 18, 0);
            lw.push_back(p);
            total += bytes;
        }
    CK(cudaStreamSynchronize(s));
    printf("\nchain of %d layers, %.2f GB of weights: ms a pass, GB/s, tok/s bound\n", layers,
           total / 1e9);
    for (int pdl = 1; pdl >= 0; --pdl)
        for (auto& v : vs) {
            auto pass = [&]() {
                for (int l = 0; l < layers; ++l)
                    for (size_t i = 0; i < shapes.size(); ++i)
                        launch(v, lw[l * shapes.size() + i], y, dst + i * 28672, shapes[i].rows,
                               shapes[i].cols, s, pdl);
            };
            pass();
            const int reps = quick ? 5 : 20;
            CK(cudaEventRecord(e0, s));
            for (int r = 0; r < reps; ++r) pass();
            CK(cudaEventRecord(e1, s));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            ms /= reps;
            printf("%-14s %s: %7.3f ms %7.0f GB/s\n", v.name, pdl ? "pdl   " : "no pdl", ms,
                   total / (ms * 1e-3) / 1e9);
            fflush(stdout);
        }
    // The whole decode step of the fused path: per layer norm, qkv, rope + cache write,
    // attention, o, norm, gate/up, SiLU, down (the kernels of fused_decode.cu and
    // decode_attention.cu, one session at position `pos`), with some kinds left out to
    // show what each costs.
    {
        const int hidden = 4096, heads = 32, kvh = 8, hd = 128, ffn = 14336;
        const int ctx = 2048;
        for (int pos : {160, 1000, 2000}) {
        float *xa, *xb, *wn, *qkv, *qrot, *delta, *gu, *cosb, *sinb;
        uint8_t* act;
        int* posd;
        CK(cudaMalloc(&xa, hidden * 4));
        CK(cudaMalloc(&xb, hidden * 4));
        CK(cudaMalloc(&wn, hidden * 4));
        CK(cudaMalloc(&qkv, 6144 * 4));
        CK(cudaMalloc(&qrot, hidden * 4));
        CK(cudaMalloc(&delta, hidden * 4));
        CK(cudaMalloc(&gu, 2 * ffn * 4));
        CK(cudaMalloc(&cosb, ctx * hd / 2 * 4));
        CK(cudaMalloc(&sinb, ctx * hd / 2 * 4));
        CK(cudaMalloc(&act, ffn / 32 * 36));
        CK(cudaMalloc(&posd, 4));
        CK(cudaMemcpy(posd, &pos, 4, cudaMemcpyHostToDevice));
        std::vector<float> ones(hidden, 0.5f), cs(ctx * hd / 2, 0.7f);
        CK(cudaMemcpy(xa, ones.data(), hidden * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(wn, ones.data(), hidden * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(cosb, cs.data(), cs.size() * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(sinb, cs.data(), cs.size() * 4, cudaMemcpyHostToDevice));
        CK(cudaMemset(delta, 0, hidden * 4));
        unsigned long long* tables;
        CK(cudaMalloc(&tables, layers * 2 * 8));
        std::vector<unsigned long long> th(layers * 2);
        for (int l = 0; l < layers; ++l)
            for (int kv = 0; kv < 2; ++kv) {
                void* c;
                CK(cudaMalloc(&c, (size_t)ctx * kvh * hd * 2));
                fill_half<<<256, 256, 0, s>>>((half*)c, (size_t)ctx * kvh * hd, l + kv * 0.5f);
                th[l * 2 + kv] = (unsigned long long)c;
            }
        CK(cudaMemcpy(tables, th.data(), th.size() * 8, cudaMemcpyHostToDevice));
        auto cfg_of = [&](dim3 g, dim3 b, size_t smem, cudaLaunchAttribute* at) {
            cudaLaunchConfig_t c = {};
            c.gridDim = g;
            c.blockDim = b;
            c.dynamicSmemBytes = smem;
            c.stream = s;
            at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
            at[0].val.programmaticStreamSerializationAllowed = 1;
            c.attrs = at;
            c.numAttrs = 1;
            return c;
        };
        enum { NORM = 1, ATTN = 2, SILU = 4, PROD = 8, ROPE = 16 };
        typedef void (*AttnK)(const float*, const unsigned long long*, const int*, float*,
                              block_q8_1*, int, float*, unsigned*, int, int, int, int, float);
        // The split attention's scratch (decode_attention.rs: SplitScratch).
        const int splits = std::min(32, (pos + 1 + 63) / 64);
        float* part;
        unsigned* count;
        CK(cudaMalloc(&part, (size_t)heads * 32 * (hd + 2) * 4));
        CK(cudaMalloc(&count, heads * 4));
        CK(cudaMemset(count, 0, heads * 4));
        struct Case {
            const char* name;
            int parts;
            size_t variant;
            AttnK attn;
            int threads;
        };
        const int ALL = NORM | ROPE | ATTN | SILU | PROD;
        std::vector<Case> cases = {
            {"full step (current)", ALL, 0, decode_attention_hd128, 512},
            {"full, matvec g 4x2", ALL, 1, decode_attention_hd128, 512},
            {"full, attn generic width", ALL, 0, decode_attention, 512},
            {"full, attn unsplit (w16 r4)", ALL, 0, attn_w16_r4, 512},
            {"full, attn w8 r2", ALL, 0, attn_w8_r2, 256},
            {"full, attn w8 r4", ALL, 0, attn_w8_r4, 256},
            {"full, attn w16 r2", ALL, 0, attn_w16_r2, 512},
            {"full, attn w16 r4", ALL, 0, attn_w16_r4, 512},
            {"full, attn w32 r2", ALL, 0, attn_w32_r2, 1024},
            {"full, attn w32 r4", ALL, 0, attn_w32_r4, 1024},
            {"no norms", ALL & ~NORM, 0, decode_attention_hd128, 512},
            {"no rope", ALL & ~ROPE, 0, decode_attention_hd128, 512},
            {"no attention kernel", ALL & ~ATTN, 0, decode_attention_hd128, 512},
            {"no silu", ALL & ~SILU, 0, decode_attention_hd128, 512},
            {"products only", PROD, 0, decode_attention_hd128, 512},
            {"small kernels only", ALL & ~PROD, 0, decode_attention_hd128, 512},
        };
        // The attention variants against decode_attention.cu's, f32 output.
        {
            std::vector<float> qh(hidden);
            for (int i = 0; i < hidden; ++i) qh[i] = sinf(i * 0.11f) * 0.5f;
            CK(cudaMemcpy(qrot, qh.data(), hidden * 4, cudaMemcpyHostToDevice));
            float *o1, *o2;
            CK(cudaMalloc(&o1, hidden * 4));
            CK(cudaMalloc(&o2, hidden * 4));
            int one = 1, H = heads, K = kvh, D = hd, st = hidden / 32;
            float scale = 0.088f;
            attn_w8_r2<<<dim3(heads, 1), 256, 0, s>>>(qrot, tables, posd, o1, nullptr, st, part,
                                                       count, one, H, K, D, scale);
            CK(cudaStreamSynchronize(s));
            std::vector<float> a(hidden), b(hidden);
            CK(cudaMemcpy(a.data(), o1, hidden * 4, cudaMemcpyDeviceToHost));
            for (auto& c : cases) {
                const int z = c.attn == decode_attention_hd128 || c.attn == decode_attention ? splits : 1;
                c.attn<<<dim3(heads, 1, z), c.threads, 0, s>>>(qrot, tables, posd, o2, nullptr, st,
                                                               part, count, one, H, K, D, scale);
                CK(cudaStreamSynchronize(s));
                CK(cudaMemcpy(b.data(), o2, hidden * 4, cudaMemcpyDeviceToHost));
                double worst = 0;
                for (int i = 0; i < hidden; ++i) worst = std::max(worst, (double)fabsf(a[i] - b[i]));
                printf("attention of %-28s: worst difference %.2e\n", c.name, worst);
            }
        }
        printf("\ndecode step emulation, 32 layers, position %d: ms a step\n", pos);
        for (auto& c : cases) {
            const Variant& v = vs[c.variant];
            auto step = [&]() {
                float *cur = xa, *nxt = xb;
                for (int l = 0; l < layers; ++l) {
                    cudaLaunchAttribute at[1];
                    float eps = 1e-5f;
                    int h = hidden, hp = hidden;
                    if (c.parts & NORM) {
                        auto cf = cfg_of(dim3(4, 1), dim3(1024), 0, at);
                        const float* dl = l == 0 ? nullptr : delta;
                        CK(cudaLaunchKernelEx(&cf, add_rmsnorm_q8_1, (const float*)cur, dl, nxt,
                                              (const float*)wn, (block_q8_1*)act, h, hp, eps));
                        std::swap(cur, nxt);
                    }
                    const uint8_t* const* lwp = &lw[l * 4];
                    if (c.parts & PROD) launch(v, lwp[0], act, qkv, 6144, 4096, s, true);
                    int one = 1, H = heads, K = kvh, D = hd, il = 0;
                    if (c.parts & ROPE) {
                        auto cf = cfg_of(dim3(1, heads + kvh), dim3(hd / 2), 0, at);
                        long long qs = 6144;
                        CK(cudaLaunchKernelEx(&cf, rope_kv_write, (const float*)qkv, qs,
                                              (const float*)(qkv + 4096), qs,
                                              (const float*)(qkv + 5120), qs, qrot,
                                              (const unsigned long long*)(tables + 2 * l),
                                              (const int*)posd, (const float*)cosb,
                                              (const float*)sinb, one, H, K, D, il));
                    }
                    if (c.parts & ATTN) {
                        const int z = c.attn == decode_attention_hd128 || c.attn == decode_attention ? splits : 1;
                        auto cf2 = cfg_of(dim3(heads, 1, z), dim3(c.threads), 0, at);
                        int stride = hidden / 32;
                        float scale = 0.088f;
                        CK(cudaLaunchKernelEx(&cf2, c.attn, (const float*)qrot,
                                              (const unsigned long long*)(tables + 2 * l),
                                              (const int*)posd, (float*)nullptr,
                                              (block_q8_1*)act, stride, part, count, one, H, K,
                                              D, scale));
                    }
                    if (c.parts & PROD) launch(v, lwp[1], act, delta, 4096, 4096, s, true);
                    if (c.parts & NORM) {
                        auto cf = cfg_of(dim3(4, 1), dim3(1024), 0, at);
                        CK(cudaLaunchKernelEx(&cf, add_rmsnorm_q8_1, (const float*)cur,
                                              (const float*)delta, nxt, (const float*)wn,
                                              (block_q8_1*)act, h, hp, eps));
                        std::swap(cur, nxt);
                    }
                    if (c.parts & PROD) launch(v, lwp[2], act, gu, 28672, 4096, s, true);
                    if (c.parts & SILU) {
                        auto cf = cfg_of(dim3(56, 1), dim3(256), 0, at);
                        int f = ffn, fp = ffn;
                        CK(cudaLaunchKernelEx(&cf, silu_mul_q8_1, (const float*)gu,
                                              (block_q8_1*)act, f, fp));
                    }
                    if (c.parts & PROD) launch(v, lwp[3], act, delta, 4096, 14336, s, true);
                }
            };
            step();
            CK(cudaStreamSynchronize(s));
            const int reps = quick ? 5 : 20;
            auto t0 = std::chrono::steady_clock::now();
            CK(cudaEventRecord(e0, s));
            for (int r = 0; r < reps; ++r) step();
            CK(cudaEventRecord(e1, s));
            auto t1 = std::chrono::steady_clock::now();
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            const double host = std::chrono::duration<double, std::milli>(t1 - t0).count();
            printf("%-28s: %7.3f ms (host enqueue %.3f ms)\n", c.name, ms / reps, host / reps);
            fflush(stdout);
        }
        }
    }
    return 0;
}
