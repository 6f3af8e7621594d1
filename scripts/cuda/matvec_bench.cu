// Times the decode matrix-vector kernel (`common/src/cuda/matvec.cu`) and variants of it on
// the 8B model's product shapes, on the GPU machine, with no model and no Rust:
//
//   scripts/cuda/build-matvec-bench.sh           # here: nvcc from build-cuda.sh's tools
//   .gpu/mb/matvec-bench [--quick]                # there
//
// The product (the production kernel, and its loop with 4 warps of 2 rows) runs every shape
// back to back, launched as the fused decode path launches them
// (programmatic stream serialization, so each launch may start loading its weights while the
// one before still runs), cycling over copies of the weight that together exceed the L2
// cache; then a chain of 32 layers of the four products, each layer's own weights (3.9 GB).
// Last, the whole fused decode step of one session (the kernels of fused_decode.cu and
// decode_attention.cu between the products) at cache depths 160, 1,000, 4,000 and 8,000,
// with variants of the grouped attention kernel (each checked against the unsplit per-head
// kernel first), with each kind of small kernel left out in turn, and attention alone (its
// cache bytes over its time), to show what each costs. Bandwidth is weight bytes over time;
// the copy bandwidth printed first is the roofline's. Variants tried and dropped are in this
// file's history and their figures in docs/benchmarks-journal.md.
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

// The production kernel's loop with 4 warps of 2 rows (its shape before this script chose 8
// warps of 1 for one activation row). Variants that were tried and dropped (K split over
// CTAs, weights copied with cp.async, other attention shapes) are in this file's history
// (commit a081a34) and their figures in docs/benchmarks.md.
extern "C" __global__ void __launch_bounds__(128, 5)
    mv_4x2(const uint8_t* __restrict__ w, const uint8_t* __restrict__ y, float* __restrict__ dst,
           int ncols_x, int nrows_x, int stride_col_y, int stride_col_dst)
{
    matvec<Q4_0, 1, 4, 2>(w, y, dst, ncols_x, nrows_x, stride_col_y, stride_col_dst);
}

// The RMSNorms folded into the products (matvec.cu's NormIn): the product before a norm (o,
// down) takes 32 rows a CTA, 8 warps of 4, and then adds its 32 results to the residual
// stream x in place, writes the Q8_1 block of x * w unscaled (its int8 values do not depend
// on the norm's scale), the block's (scale, sum) to `side` and its sum of squares of x to
// `part`; the product after it (q/k/v, gate/up) scales each block as it copies it in. No
// norm kernel runs between them.
extern "C" __global__ void __launch_bounds__(256, 1)
    mv_resid(const uint8_t* __restrict__ w, const uint8_t* __restrict__ y,
             float* __restrict__ delta, int ncols_x, int nrows_x, int stride_col_y,
             float* __restrict__ x, const float* __restrict__ nw, block_q8_1* __restrict__ out,
             float2* __restrict__ side, float* __restrict__ part)
{
    matvec<Q4_0, 1, 8, 4>(w, y, delta, ncols_x, nrows_x, stride_col_y, nrows_x);
    __syncthreads();  // this CTA's 32 results are in `delta`
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x, i = blockIdx.x * 32 + lane;
    const float v = x[i] + __ldcg(delta + i);
    x[i] = v;
    const float vw = v * nw[i];
    const float amax = warp_max(fabsf(vw)), sum = warp_sum(vw), ss = warp_sum(v * v);
    const float d = amax / 127.0f;
    out[blockIdx.x].qs[lane] = amax == 0.0f ? 0 : (int8_t)roundf(vw / d);
    if (lane == 0) {
        side[blockIdx.x] = make_float2(d, sum);
        part[blockIdx.x] = ss;
    }
}

extern "C" __global__ void __launch_bounds__(256, 4)
    mv_norm(const uint8_t* __restrict__ w, const uint8_t* __restrict__ y,
            float* __restrict__ dst, int ncols_x, int nrows_x, int stride_col_y,
            const float2* __restrict__ side, const float* __restrict__ part, int nparts,
            float eps)
{
    matvec<Q4_0, 1, 8, 1, true>(w, y, dst, ncols_x, nrows_x, stride_col_y, nrows_x,
                                NormIn{side, part, nparts, ncols_x, eps});
}

// The grouped attention kernel for the 8B shape (4 query heads a key/value head) in other
// shapes: MINB caps the registers for 2 CTAs a multiprocessor; pf: next rows loaded ahead;
// r8: 8 rows a warp an iteration; e: first rows loaded before the wait; o: one-pass combine.
GROUPED_SHAPE(att_g4_pf_m2, 4, true, 2, 4, false, false)
GROUPED_SHAPE(att_g4_e, 4, false, 1, 4, true, false)
GROUPED_SHAPE(att_g4_o, 4, false, 1, 4, false, true)
GROUPED_SHAPE(att_g4_eo, 4, false, 1, 4, true, true)
GROUPED_SHAPE(att_g4_pf_eo_m2, 4, true, 2, 4, true, true)
GROUPED_SHAPE(att_g4_r8_eo_m2, 4, false, 2, 8, true, true)
// A lane a row for the scores (`attention_rowlane`).
GROUPED_ROWLANE(att_g4_rl, 4, 2, false)
GROUPED_ROWLANE(att_g4_rl_o, 4, 2, true)
GROUPED_ROWLANE(att_g4_rl_m1, 4, 1, false)
// ... and with RoPE and the cache write folded in (no rope_kv_write launch).
GROUPED_ROPE(att_g4_rope, 4, false, 1, 4, false, false)
GROUPED_ROPE(att_g4_rope_eo, 4, false, 1, 4, true, true)
typedef void (*AttnR)(const float*, long long, const float*, long long, const float*, long long,
                      const unsigned long long*, const int*, const float*, const float*, float*,
                      block_q8_1*, int, float*, unsigned*, int, int, int, int, float, int);

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
        {"8 warps x 1", matvec_q4_0_c1, CTA_ROWS, 256, 1, smem_cur},
        {"4 warps x 2", mv_4x2, CTA_ROWS, 128, 1, smem_cur},
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
    // Warm up (clocks ramp up under load): half a second of passes before anything is timed.
    {
        auto t0 = std::chrono::steady_clock::now();
        while (std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(500)) {
            for (int l = 0; l < layers; ++l)
                for (size_t i = 0; i < shapes.size(); ++i)
                    launch(vs[0], lw[l * shapes.size() + i], y, dst + i * 28672, shapes[i].rows,
                           shapes[i].cols, s, true);
            CK(cudaStreamSynchronize(s));
        }
    }
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
        const int ctx = 8192;
        for (int pos : {160, 1000, 4000, 8000}) {
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
        // the folded norms' buffers: the normalized activation's blocks, their (scale, sum)
        // and the partial sums of squares
        uint8_t* act_b;
        float2* nside;
        float* npart;
        CK(cudaMalloc(&act_b, hidden / 32 * 36));
        CK(cudaMalloc(&nside, hidden / 32 * sizeof(float2)));
        CK(cudaMalloc(&npart, hidden / 32 * sizeof(float)));
        const size_t resid_smem = PASS * 36 + 32 * PASS * 18;
        CK(cudaFuncSetAttribute(mv_resid, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)resid_smem));
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
        auto splits_of = [&](int most) { return std::min(most, (pos + 1 + 63) / 64); };
        float* part;
        unsigned* count;
        CK(cudaMalloc(&part, (size_t)heads * 64 * (hd + 2) * 4));
        CK(cudaMalloc(&count, heads * 4));
        CK(cudaMemset(count, 0, heads * 4));
        struct Case {
            const char* name;
            int parts;
            size_t variant;
            AttnK attn;
            int threads;
            int max_splits;  // 1: unsplit
            int gx;  // CTAs of the grid's x: query heads, or key/value heads (grouped)
            AttnR fused = nullptr;  // instead of rope_kv_write and `attn`
            bool folded = false;    // the RMSNorms folded into the products (mv_resid, mv_norm)
        };
        const int ALL = NORM | ROPE | ATTN | SILU | PROD;
                const int T = GW * 32;
        const AttnK P = decode_attention_hd128_g4;
        std::vector<Case> cases = {
            {"full step", ALL, 0, P, T, 32, kvh},
            {"full, attention early", ALL, 0, att_g4_e, T, 32, kvh},
            {"full, attention one pass", ALL, 0, att_g4_o, T, 32, kvh},
            {"full, attention early+1pass", ALL, 0, att_g4_eo, T, 32, kvh},
            {"full, att e+1p pf", ALL, 0, att_g4_pf_eo_m2, T, 32, kvh},
            {"full, att e+1p 8 rows", ALL, 0, att_g4_r8_eo_m2, T, 32, kvh},
            {"full, attention pf", ALL, 0, att_g4_pf_m2, T, 32, kvh},
            {"full, attention a lane a row", ALL, 0, att_g4_rl, T, 32, kvh},
            {"full, norms folded", ALL, 0, P, T, 32, kvh, nullptr, true},
            {"full, norms folded, rope in", ALL, 0, P, T, 32, kvh, att_g4_rope, true},
            {"full, folded, rope in, e+1p", ALL, 0, P, T, 32, kvh, att_g4_rope_eo, true},
            {"full, rope in attention", ALL, 0, P, T, 32, kvh, att_g4_rope},
            {"full, rope in att, e+1p", ALL, 0, P, T, 32, kvh, att_g4_rope_eo},
            {"no norms", ALL & ~NORM, 0, P, T, 32, kvh},
            {"no rope", ALL & ~ROPE, 0, P, T, 32, kvh},
            {"no attention kernel", ALL & ~ATTN, 0, P, T, 32, kvh},
            {"no silu", ALL & ~SILU, 0, P, T, 32, kvh},
            {"products only", PROD, 0, P, T, 32, kvh},
            {"small kernels only", ALL & ~PROD, 0, P, T, 32, kvh},
            {"attention only", ATTN, 0, P, T, 32, kvh},
            {"attn only, early", ATTN, 0, att_g4_e, T, 32, kvh},
            {"attn only, one pass", ATTN, 0, att_g4_o, T, 32, kvh},
            {"attn only, early+1pass", ATTN, 0, att_g4_eo, T, 32, kvh},
            {"attn only, e+1p pf", ATTN, 0, att_g4_pf_eo_m2, T, 32, kvh},
            {"attn only, e+1p 8 rows", ATTN, 0, att_g4_r8_eo_m2, T, 32, kvh},
            {"attn only, e+1p 8 rows/64", ATTN, 0, att_g4_r8_eo_m2, T, 64, kvh},
            {"attn only, e+1p/64", ATTN, 0, att_g4_eo, T, 64, kvh},
            {"attn only, a lane a row", ATTN, 0, att_g4_rl, T, 32, kvh},
            {"attn only, a lane a row, 1p", ATTN, 0, att_g4_rl_o, T, 32, kvh},
            {"attn only, a lane a row, 1 CTA", ATTN, 0, att_g4_rl_m1, T, 32, kvh},
            {"attn only, a lane a row/16", ATTN, 0, att_g4_rl, T, 16, kvh},
            {"attn only, a lane a row/64", ATTN, 0, att_g4_rl, T, 64, kvh},
            {"rope+attn", ATTN | ROPE, 0, P, T, 32, kvh},
            {"rope+attn, fused", ATTN | ROPE, 0, P, T, 32, kvh, att_g4_rope},
            {"rope+attn, fused e+1p", ATTN | ROPE, 0, P, T, 32, kvh, att_g4_rope_eo},
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
            // The reference: one CTA a head, no split.
            decode_attention_hd128<<<dim3(heads, 1, 1), 512, 0, s>>>(
                qrot, tables, posd, o1, nullptr, st, part, count, one, H, K, D, scale);
            CK(cudaStreamSynchronize(s));
            std::vector<float> a(hidden), b(hidden);
            CK(cudaMemcpy(a.data(), o1, hidden * 4, cudaMemcpyDeviceToHost));
            for (auto& c : cases) {
                if (c.fused != nullptr) continue;
                const int z = splits_of(c.max_splits);
                c.attn<<<dim3(c.gx, 1, z), c.threads, 0, s>>>(qrot, tables, posd, o2, nullptr, st,
                                                               part, count, one, H, K, D, scale);
                CK(cudaStreamSynchronize(s));
                CK(cudaMemcpy(b.data(), o2, hidden * 4, cudaMemcpyDeviceToHost));
                double worst = 0;
                for (int i = 0; i < hidden; ++i)
                    worst = std::max(worst, (double)fabsf(a[i] - b[i]));
                printf("attention of %-28s: worst difference %.2e\n", c.name, worst);
            }
            // The fused kernels against rope_kv_write then the unsplit kernel, from the same
            // q, k and v before RoPE, both pair layouts.
            std::vector<float> raw(6144);
            for (int i = 0; i < 6144; ++i) raw[i] = cosf(i * 0.013f) * 0.8f;
            std::vector<float> cs2(ctx * hd / 2), sn2(ctx * hd / 2);
            for (int i = 0; i < ctx * hd / 2; ++i) {
                cs2[i] = cosf(i * 0.001f);
                sn2[i] = sinf(i * 0.001f);
            }
            CK(cudaMemcpy(cosb, cs2.data(), cs2.size() * 4, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(sinb, sn2.data(), sn2.size() * 4, cudaMemcpyHostToDevice));
            for (int il = 0; il < 2; ++il) {
                CK(cudaMemcpy(qkv, raw.data(), 6144 * 4, cudaMemcpyHostToDevice));
                long long qs = 6144;
                rope_kv_write<<<dim3(1, heads + kvh), hd / 2, 0, s>>>(
                    qkv, qs, qkv + 4096, qs, qkv + 5120, qs, qrot, tables, posd, cosb, sinb, one,
                    H, K, D, il);
                decode_attention_hd128<<<dim3(heads, 1, 1), 512, 0, s>>>(
                    qrot, tables, posd, o1, nullptr, st, part, count, one, H, K, D, scale);
                CK(cudaStreamSynchronize(s));
                CK(cudaMemcpy(a.data(), o1, hidden * 4, cudaMemcpyDeviceToHost));
                // the newest cache rows rope_kv_write wrote (layer 0's caches), and a way to
                // spoil them (all ones: NaN halves) so that a kernel must write them itself
                const size_t row_off = (size_t)pos * kvh * hd, row_bytes = (size_t)kvh * hd * 2;
                std::vector<uint8_t> kref(row_bytes), vref(row_bytes), kgot(row_bytes),
                    vgot(row_bytes);
                __half* kc0 = (__half*)th[0] + row_off;
                __half* vc0 = (__half*)th[1] + row_off;
                CK(cudaMemcpy(kref.data(), kc0, row_bytes, cudaMemcpyDeviceToHost));
                CK(cudaMemcpy(vref.data(), vc0, row_bytes, cudaMemcpyDeviceToHost));
                auto spoil = [&]() {
                    CK(cudaMemsetAsync(kc0, 0xff, row_bytes, s));
                    CK(cudaMemsetAsync(vc0, 0xff, row_bytes, s));
                };
                auto report = [&](const char* name, const char* how) {
                    CK(cudaStreamSynchronize(s));
                    CK(cudaMemcpy(b.data(), o2, hidden * 4, cudaMemcpyDeviceToHost));
                    CK(cudaMemcpy(kgot.data(), kc0, row_bytes, cudaMemcpyDeviceToHost));
                    CK(cudaMemcpy(vgot.data(), vc0, row_bytes, cudaMemcpyDeviceToHost));
                    double worst = 0;
                    for (int i = 0; i < hidden; ++i) {
                        const double d = fabsf(a[i] - b[i]);
                        worst = d == d ? std::max(worst, d) : INFINITY;  // NaN: wrong
                    }
                    const bool same = kgot == kref && vgot == vref;
                    printf("attention of %-28s (pairs %s, %s): worst difference %.2e, newest "
                           "cache row %s\n", name, il ? "interleaved" : "halves", how, worst,
                           same ? "equal" : "DIFFERS");
                };
                for (auto& c : cases) {
                    if (c.fused == nullptr) continue;
                    const int z = splits_of(c.max_splits);
                    spoil();
                    c.fused<<<dim3(c.gx, 1, z), c.threads, 0, s>>>(
                        qkv, qs, qkv + 4096, qs, qkv + 5120, qs, tables, posd, cosb, sinb, o2,
                        nullptr, st, part, count, one, H, K, D, scale, il);
                    report(c.name, "folded");
                }
                // The kernels that load their first rows before the wait, launched to overlap
                // rope_kv_write as in a step, the newest row spoiled before it: they must reload
                // it once rope_kv_write has written it.
                for (AttnK early : {att_g4_e, att_g4_eo}) {
                    spoil();
                    cudaLaunchAttribute at[1];
                    auto cf = cfg_of(dim3(1, heads + kvh), dim3(hd / 2), 0, at);
                    CK(cudaLaunchKernelEx(&cf, rope_kv_write, (const float*)qkv, qs,
                                          (const float*)(qkv + 4096), qs,
                                          (const float*)(qkv + 5120), qs, qrot,
                                          (const unsigned long long*)tables, (const int*)posd,
                                          (const float*)cosb, (const float*)sinb, one, H, K, D,
                                          il));
                    auto cf2 = cfg_of(dim3(kvh, 1, splits_of(32)), dim3(GW * 32), 0, at);
                    CK(cudaLaunchKernelEx(&cf2, early, (const float*)qrot,
                                          (const unsigned long long*)tables, (const int*)posd, o2,
                                          (block_q8_1*)nullptr, st, part, count, one, H, K, D,
                                          scale));
                    report(early == att_g4_e ? "first rows early" : "early + one-pass",
                           "overlapping rope_kv_write");
                }
            }
        }
        printf("\ndecode step emulation, 32 layers, position %d: ms a step\n", pos);
        for (auto& c : cases) {
            const Variant& v = vs[c.variant];
            // the folded norms' products: `resid` before a norm, `normed` after one
            static_assert(hidden % 32 == 0, "mv_resid takes 32 rows a CTA");
            auto resid = [&](const uint8_t* w, const uint8_t* y, int cols, float* x) {
                cudaLaunchAttribute at[1];
                auto cf = cfg_of(dim3(hidden / 32), dim3(256), resid_smem, at);
                int sy = (cols + 511) / 512 * 16, rows = hidden;
                CK(cudaLaunchKernelEx(&cf, mv_resid, w, y, delta, cols, rows, sy, x,
                                      (const float*)wn, (block_q8_1*)act_b, nside, npart));
            };
            auto normed = [&](const uint8_t* w, float* dst, int rows) {
                cudaLaunchAttribute at[1];
                auto cf = cfg_of(dim3(rows / CTA_ROWS), dim3(256), smem_cur(hidden), at);
                int sy = (hidden + 511) / 512 * 16, cols = hidden, np = hidden / 32;
                float eps = 1e-5f;
                CK(cudaLaunchKernelEx(&cf, mv_norm, w, (const uint8_t*)act_b, dst, cols, rows,
                                      sy, (const float2*)nside, (const float*)npart, np, eps));
            };
            if (c.folded && pos == 160) {
                // One layer's o then gate/up, folded against the norm kernel between them.
                std::vector<float> x0(hidden);
                for (int i = 0; i < hidden; ++i) x0[i] = sinf(i * 0.7f) * 3.0f;
                const uint8_t* const* lwp = &lw[4];
                CK(cudaMemcpy(xa, x0.data(), hidden * 4, cudaMemcpyHostToDevice));
                // an activation of valid Q8_1 blocks, kept in act_b
                fill<<<64, 256, 0, s>>>(act_b, hidden / 32 * 36, 5);
                fix_scales<<<64, 256, 0, s>>>(act_b, hidden / 32, 36, 1);
                // the reference: o, the norm kernel, gate/up
                launch(vs[0], lwp[1], act_b, delta, 4096, 4096, s, false);
                add_rmsnorm_q8_1<<<dim3(4, 1), 1024, 0, s>>>(xa, delta, xb, wn,
                                                             (block_q8_1*)act, hidden, hidden,
                                                             1e-5f);
                launch(vs[0], lwp[2], act, gu, 28672, 4096, s, false);
                std::vector<float> ref(28672), got(28672), xr(hidden), xf(hidden);
                CK(cudaMemcpyAsync(ref.data(), gu, 28672 * 4, cudaMemcpyDeviceToHost, s));
                CK(cudaMemcpyAsync(xr.data(), xb, hidden * 4, cudaMemcpyDeviceToHost, s));
                CK(cudaStreamSynchronize(s));
                // folded: o writes x in place and the unscaled blocks, gate/up scales them
                CK(cudaMemcpy(xa, x0.data(), hidden * 4, cudaMemcpyHostToDevice));
                CK(cudaMemcpyAsync(act, act_b, hidden / 32 * 36, cudaMemcpyDeviceToDevice, s));
                resid(lwp[1], act, 4096, xa);
                normed(lwp[2], gu, 28672);
                CK(cudaMemcpyAsync(got.data(), gu, 28672 * 4, cudaMemcpyDeviceToHost, s));
                CK(cudaMemcpyAsync(xf.data(), xa, hidden * 4, cudaMemcpyDeviceToHost, s));
                CK(cudaStreamSynchronize(s));
                double worst = 0, mag = 0, xd = 0;
                for (int i = 0; i < 28672; ++i) {
                    worst = std::max(worst, (double)fabsf(ref[i] - got[i]));
                    mag = std::max(mag, (double)fabsf(ref[i]));
                }
                for (int i = 0; i < hidden; ++i) xd = std::max(xd, (double)fabsf(xr[i] - xf[i]));
                printf("norms folded: gate/up differs by %.2e of its largest %.2e, the residual by "
                       "%.2e\n", worst, mag, xd);
            }
            auto step = [&]() {
                float *cur = xa, *nxt = xb;
                for (int l = 0; l < layers; ++l) {
                    cudaLaunchAttribute at[1];
                    float eps = 1e-5f;
                    int h = hidden, hp = hidden;
                    if ((c.parts & NORM) && (!c.folded || l == 0)) {
                        auto cf = cfg_of(dim3(4, 1), dim3(1024), 0, at);
                        const float* dl = l == 0 ? nullptr : delta;
                        block_q8_1* o = (block_q8_1*)(c.folded ? act_b : act);
                        CK(cudaLaunchKernelEx(&cf, add_rmsnorm_q8_1, (const float*)cur, dl, nxt,
                                              (const float*)wn, o, h, hp, eps));
                        std::swap(cur, nxt);
                    }
                    const uint8_t* const* lwp = &lw[l * 4];
                    if ((c.parts & PROD) && c.folded && l > 0) {
                        normed(lwp[0], qkv, 6144);
                    } else if (c.parts & PROD) {
                        launch(v, lwp[0], c.folded ? act_b : act, qkv, 6144, 4096, s, true);
                    }
                    int one = 1, H = heads, K = kvh, D = hd, il = 0;
                    if (c.fused != nullptr && (c.parts & ATTN)) {
                        const int z = splits_of(c.max_splits);
                        auto cf2 = cfg_of(dim3(c.gx, 1, z), dim3(c.threads), 0, at);
                        long long qs = 6144;
                        int stride = hidden / 32, il = 0;
                        float scale = 0.088f;
                        CK(cudaLaunchKernelEx(&cf2, c.fused, (const float*)qkv, qs,
                                              (const float*)(qkv + 4096), qs,
                                              (const float*)(qkv + 5120), qs,
                                              (const unsigned long long*)(tables + 2 * l),
                                              (const int*)posd, (const float*)cosb,
                                              (const float*)sinb, (float*)nullptr,
                                              (block_q8_1*)act, stride, part, count, one, H, K,
                                              D, scale, il));
                    }
                    if ((c.parts & ROPE) && c.fused == nullptr) {
                        auto cf = cfg_of(dim3(1, heads + kvh), dim3(hd / 2), 0, at);
                        long long qs = 6144;
                        CK(cudaLaunchKernelEx(&cf, rope_kv_write, (const float*)qkv, qs,
                                              (const float*)(qkv + 4096), qs,
                                              (const float*)(qkv + 5120), qs, qrot,
                                              (const unsigned long long*)(tables + 2 * l),
                                              (const int*)posd, (const float*)cosb,
                                              (const float*)sinb, one, H, K, D, il));
                    }
                    if ((c.parts & ATTN) && c.fused == nullptr) {
                        const int z = splits_of(c.max_splits);
                        auto cf2 = cfg_of(dim3(c.gx, 1, z), dim3(c.threads), 0, at);
                        int stride = hidden / 32;
                        float scale = 0.088f;
                        CK(cudaLaunchKernelEx(&cf2, c.attn, (const float*)qrot,
                                              (const unsigned long long*)(tables + 2 * l),
                                              (const int*)posd, (float*)nullptr,
                                              (block_q8_1*)act, stride, part, count, one, H, K,
                                              D, scale));
                    }
                    if (c.folded) {
                        // o, then gate/up on its normalized output, no norm kernel between
                        resid(lwp[1], act, 4096, cur);
                        normed(lwp[2], gu, 28672);
                    } else {
                        if (c.parts & PROD) launch(v, lwp[1], act, delta, 4096, 4096, s, true);
                        if (c.parts & NORM) {
                            auto cf = cfg_of(dim3(4, 1), dim3(1024), 0, at);
                            CK(cudaLaunchKernelEx(&cf, add_rmsnorm_q8_1, (const float*)cur,
                                                  (const float*)delta, nxt, (const float*)wn,
                                                  (block_q8_1*)act, h, hp, eps));
                            std::swap(cur, nxt);
                        }
                        if (c.parts & PROD) launch(v, lwp[2], act, gu, 28672, 4096, s, true);
                    }
                    if (c.parts & SILU) {
                        auto cf = cfg_of(dim3(56, 1), dim3(256), 0, at);
                        int f = ffn, fp = ffn;
                        CK(cudaLaunchKernelEx(&cf, silu_mul_q8_1, (const float*)gu,
                                              (block_q8_1*)act, f, fp));
                    }
                    if (c.folded) {
                        resid(lwp[3], act, 14336, cur);  // the next layer's q/k/v normalizes it
                    } else if (c.parts & PROD) {
                        launch(v, lwp[3], act, delta, 4096, 14336, s, true);
                    }
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
            printf("%-28s: %7.3f ms (host enqueue %.3f ms)", c.name, ms / reps, host / reps);
            if (c.parts == ATTN)  // the cache's bytes a step over its time
                printf(", cache %.0f GB/s",
                       (double)layers * 2 * (pos + 1) * kvh * hd * 2 / (ms / reps * 1e-3) / 1e9);
            printf("\n");
            fflush(stdout);
        }
        // this depth's caches (a GB) and buffers
        for (auto p : th) CK(cudaFree((void*)p));
        for (void* p : {(void*)xa, (void*)xb, (void*)wn, (void*)qkv, (void*)qrot, (void*)delta,
                        (void*)gu, (void*)cosb, (void*)sinb, (void*)act, (void*)posd,
                        (void*)tables, (void*)part, (void*)count, (void*)act_b, (void*)nside,
                        (void*)npart})
            CK(cudaFree(p));
        }
    }
    return 0;
}
