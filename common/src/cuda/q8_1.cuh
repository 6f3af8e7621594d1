// Q8_1 blocks as candle's mmvq kernels read them (`block_q8_1` in candle-kernels'
// mmvq_gguf.cu): two halves, the scale d and the sum of the 32 unquantized values, then 32
// int8 values; quantized as candle's `mmvq_gguf_quantize_q8_1_f32` does.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

#define QK 32

struct block_q8_1 {
    half2 ds;
    int8_t qs[QK];
};

// Programmatic dependent launch (sm_90 and later; no-ops before, and for kernels launched the
// ordinary way). `pdl_trigger`: this kernel's successor may start now (it waits with
// `pdl_wait` before it reads anything this kernel writes). `pdl_wait`: wait until the kernel
// before has finished and its writes are visible.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// One warp quantizes one block of 32 values, lane `l` holding value `l`; all 32 lanes must
// take part.
__device__ __forceinline__ void quantize_block(float v, block_q8_1* out, int lane) {
    const float amax = warp_max(fabsf(v));
    const float sum = warp_sum(v);
    const float d = amax / 127.0f;
    out->qs[lane] = (amax == 0.0f) ? 0 : (int8_t)roundf(v / d);
    if (lane == 0) {
        out->ds = make_half2(__float2half(d), __float2half(sum));
    }
}
