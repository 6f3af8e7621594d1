// The gated activation of a fused [gate | up] projection in one pass: out[r, c] =
// act(y[r, c]) * y[r, w + c], for prompt chunks (decode steps take `silu_mul_q8_1`).
// act is SiLU (gelu = 0) or GELU's tanh form (gelu = 1), in f32 as candle's ops compute them.
// Grid: (ceil(w / 256), n), 256 threads; each thread one value.
extern "C" __global__ void gate_mul_rows(const float* __restrict__ y, long long y_stride,
                                         float* __restrict__ out, int w, int gelu)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= w) return;
    const long long r = blockIdx.y;
    const float g = y[r * y_stride + c];
    const float u = y[r * y_stride + w + c];
    float a;
    if (gelu) {
        const float k = 0.7978845608028654f;  // sqrt(2 / pi)
        a = 0.5f * g * (1.f + tanhf(k * (g + 0.044715f * g * g * g)));
    } else {
        a = g / (1.f + expf(-g));
    }
    out[r * w + c] = a * u;
}
