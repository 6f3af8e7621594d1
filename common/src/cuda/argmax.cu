// Greedy picks on the GPU: the index of each row's largest value, so that a greedy decode step
// copies one u32 a session to the host instead of its whole row of logits (49152 floats for
// the default vocabulary) and scans nothing there.
#include <limits.h>
#include <math_constants.h>

// (value, index) b replaces a when larger, or equal at a smaller index: the first largest
// value wins, as `common::sampling::argmax` on the host picks it.
__device__ __forceinline__ void better(float& v, int& i, float v2, int i2)
{
    if (v2 > v || (v2 == v && i2 < i)) {
        v = v2;
        i = i2;
    }
}

// Grid: one CTA a row (at most 1024 threads, a multiple of 32). out[r] = the row's argmax,
// or UINT_MAX when the row holds a NaN (the host then reports it, as its sampler does).
extern "C" __global__ void argmax_rows(const float* __restrict__ x, unsigned* __restrict__ out,
                                       int n)
{
    const float* row = x + (long long)blockIdx.x * n;
    float v = -CUDART_INF_F;
    int i = INT_MAX;
    bool nan = false;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float y = row[j];
        if (y != y) {
            nan = true;
        } else if (i == INT_MAX || y > v) {
            v = y;
            i = j;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(0xffffffff, v, o);
        const int i2 = __shfl_xor_sync(0xffffffff, i, o);
        better(v, i, v2, i2);
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = i;
    }
    nan = __syncthreads_or(nan);
    if (warp != 0) return;
    v = lane < warps ? sv[lane] : -CUDART_INF_F;
    i = lane < warps ? si[lane] : INT_MAX;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(0xffffffff, v, o);
        const int i2 = __shfl_xor_sync(0xffffffff, i, o);
        better(v, i, v2, i2);
    }
    if (lane == 0) out[blockIdx.x] = nan ? UINT_MAX : (unsigned)i;
}
