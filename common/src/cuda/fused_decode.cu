// The small kernels of the fused decode path (`fused_decode.rs`): everything of a block's
// decode step except the quantized matrix-vector products (`matvec.cu`, or candle's mmvq
// kernels) and attention (`decode_attention.cu`, whose second kernel writes its output as
// Q8_1), each fused so that a block takes nine launches.
//
// The quantized products read their input as Q8_1 blocks (two halves d and sum, then 32
// int8), rows padded to `n_padded` values with zero blocks, the layout candle's
// `mmvq_gguf_quantize_q8_1_f32` writes. The kernels here write that layout directly from the
// values they compute, so no f32 activation is stored only to be quantized.
//
// Every kernel here waits for the kernel before it at its start (`pdl_wait`, q8_1.cuh), so
// `pdl.rs` may launch it to overlap that kernel's end.
//
// Rounding: the values quantized are those candle's ops would compute (rmsnorm as
// x * rsqrt(mean(x^2) + eps) * w; silu(g) * u), quantized as candle's kernel does.
#include "q8_1.cuh"

// Sum of squares of row r of x_in + delta (delta may be null), over the whole row, by every
// CTA that works on the row: re-reading a row from L2 costs less than a second launch, and
// spreads the norm over many multiprocessors instead of one. Rows are read as float4 (n is a
// multiple of 32 and rows start 16-byte aligned), so a 1024-thread CTA reads a row of 4096 in
// one load each: a loop of dependent loads made this latency-bound (10 us per call).
__device__ __forceinline__ float row_sum_sq(const float* __restrict__ xr,
                                            const float* __restrict__ dr, int n)
{
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    const float4* d4 = reinterpret_cast<const float4*>(dr);
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n / 4; i += blockDim.x) {
        float4 v = x4[i];
        if (dr != nullptr) {
            const float4 e = d4[i];
            v.x += e.x;
            v.y += e.y;
            v.z += e.z;
            v.w += e.w;
        }
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    ss = warp_sum(ss);
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    float t = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(t);
}

// Grid (chunks of 32 blocks of 32 values, rows), 1024 threads: x_out[r] = x_in[r] + delta[r]
// (delta may be null: a copy), and out[r] = Q8_1(rmsnorm(x_out[r]) * w), each CTA writing
// its chunk. x_out must not alias x_in: other CTAs still read x_in.
extern "C" __global__ void add_rmsnorm_q8_1(
    const float* __restrict__ x_in, const float* __restrict__ delta, float* __restrict__ x_out,
    const float* __restrict__ w, block_q8_1* __restrict__ out, int n, int n_padded, float eps)
{
    pdl_trigger();  // the product after this may start loading its weights
    const int r = blockIdx.y;
    const int lane = threadIdx.x & 31;
    const int b = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int i = b * QK + lane;
    // The norm's weight does not come from the kernel before: load it before the wait, so
    // that its round trip is not on the step's critical path.
    const float wi = b < n_padded / QK && i < n ? w[i] : 0.0f;
    pdl_wait();     // this kernel's input comes from the one before
    const float* xr = x_in + (long long)r * n;
    const float* dr = delta != nullptr ? delta + (long long)r * n : nullptr;
    const float scale = rsqrtf(row_sum_sq(xr, dr, n) / (float)n + eps);
    if (b >= n_padded / QK) return;
    float q = 0.0f;
    if (i < n) {
        const float v = dr != nullptr ? xr[i] + dr[i] : xr[i];
        x_out[(long long)r * n + i] = v;
        q = v * scale * wi;
    }
    quantize_block(q, out + (long long)r * (n_padded / QK) + b, lane);
}

// Grid (blocks of 32 values / warps per block, rows): out[r] = Q8_1(silu(gu[r, i]) *
// gu[r, f + i]) for i < f, `gu` holding the gate then the up projection of each row.
extern "C" __global__ void silu_mul_q8_1(
    const float* __restrict__ gu, block_q8_1* __restrict__ out, int f, int f_padded)
{
    pdl_trigger();  // the product after this may start loading its weights
    pdl_wait();     // this kernel's input comes from the one before
    const int r = blockIdx.y;
    const int lane = threadIdx.x & 31;
    const int b = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (b >= f_padded / QK) return;
    const int i = b * QK + lane;
    float v = 0.0f;
    if (i < f) {
        const float g = gu[(long long)r * 2 * f + i];
        const float u = gu[(long long)r * 2 * f + f + i];
        v = g / (1.0f + expf(-g)) * u;
    }
    quantize_block(v, out + (long long)r * (f_padded / QK) + b, lane);
}

// x[i] += delta[i] for i < len.
extern "C" __global__ void add_into(float* __restrict__ x, const float* __restrict__ delta,
                                    long long len)
{
    pdl_wait();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < len) x[i] += delta[i];
}

// Steps of more rows than one mmvq launch takes use candle's mmq kernels, which quantize
// f32 input themselves: these two write the f32 values instead of Q8_1.

// As add_rmsnorm_q8_1, writing out[r] = rmsnorm(x_out[r]) * w in f32. Grid (chunks of 256
// values, rows), 1024 threads.
extern "C" __global__ void add_rmsnorm_f32(
    const float* __restrict__ x_in, const float* __restrict__ delta, float* __restrict__ x_out,
    const float* __restrict__ w, float* __restrict__ out, int n, float eps)
{
    pdl_wait();
    const int r = blockIdx.y;
    const float* xr = x_in + (long long)r * n;
    const float* dr = delta != nullptr ? delta + (long long)r * n : nullptr;
    const float scale = rsqrtf(row_sum_sq(xr, dr, n) / (float)n + eps);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = dr != nullptr ? xr[i] + dr[i] : xr[i];
    x_out[(long long)r * n + i] = v;
    out[(long long)r * n + i] = v * scale * w[i];
}

// Grid (ceil(f / 256), rows): out[r, i] = silu(gu[r, i]) * gu[r, f + i].
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gu, float* __restrict__ out,
                                        int f)
{
    pdl_wait();
    const int r = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= f) return;
    const float g = gu[(long long)r * 2 * f + i];
    const float u = gu[(long long)r * 2 * f + f + i];
    out[(long long)r * f + i] = g / (1.0f + expf(-g)) * u;
}
