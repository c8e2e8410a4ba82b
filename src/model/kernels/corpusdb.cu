// corpusdb's own CUDA kernels, compiled to PTX by build.rs when the `cuda` feature is on and
// loaded by src/model/cuda.rs. Each one has a CPU twin it must agree with bit for bit or
// within rounding; tests compare them on a GPU (benches/gpu.rs --check).

#include <stdint.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL

// SplitMix64's output function (src/synth.rs).
__device__ __forceinline__ uint64_t splitmix_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// The keep/drop draw of element i of a keyed dropout mask, exactly as
// rng::dropout_in_place draws it on the CPU: chunks of 2^16 elements, chunk c's stream is
// SplitMix64::keyed(base, [c]), element j of the chunk is that stream's (j+1)-th output.
__device__ __forceinline__ bool dropped(uint64_t base, uint64_t i, float p) {
    uint64_t chunk = i >> 16, j = i & 0xFFFF;
    uint64_t state = splitmix_mix(base + GOLDEN) ^ (chunk * GOLDEN);
    uint64_t z = splitmix_mix(state + (j + 1) * GOLDEN);
    float u = (float)(z >> 40) / 16777216.0f;
    return u < p;
}

extern "C" __global__ void keyed_dropout_f32(const float *in, float *out, uint64_t n,
                                             uint64_t base, float p, float keep) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        out[i] = dropped(base, i, p) ? 0.0f : in[i] * keep;
    }
}

extern "C" __global__ void keyed_dropout_f64(const double *in, double *out, uint64_t n,
                                             uint64_t base, float p, float keep) {
    double k = (double)keep;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        out[i] = dropped(base, i, p) ? 0.0 : in[i] * k;
    }
}

// ---- RMS norm: one block per row, sums in f32 ----

#include <cuda_bf16.h>

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16(v);
}

// The sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread
// gets it.
__device__ float block_sum(float v, float *shared) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // `shared` may still be read from a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = blockDim.x / 32;
    v = lane < warps ? shared[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// y = x * w / sqrt(mean(x^2) + eps), row by row.
template <typename T>
__device__ void rms_norm_fwd(const T *x, const T *w, T *y, int dim, float eps) {
    __shared__ float shared[32];
    const T *row = x + (size_t)blockIdx.x * dim;
    T *out = y + (size_t)blockIdx.x * dim;
    float squares = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = to_float(row[i]);
        squares += v * v;
    }
    float r = rsqrtf(block_sum(squares, shared) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        out[i] = from_float<T>(to_float(row[i]) * r * to_float(w[i]));
    }
}

// dx = r*(g*w) - x * r^3 * mean(g*w*x), r = 1/sqrt(mean(x^2) + eps); w is frozen.
template <typename T>
__device__ void rms_norm_bwd(const T *x, const T *g, const T *w, T *dx, int dim, float eps) {
    __shared__ float shared[32];
    size_t base = (size_t)blockIdx.x * dim;
    float squares = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = to_float(x[base + i]);
        squares += v * v;
        dot += to_float(g[base + i]) * to_float(w[i]) * v;
    }
    squares = block_sum(squares, shared);
    dot = block_sum(dot, shared);
    float r = rsqrtf(squares / dim + eps);
    float c = r * r * r * dot / dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = to_float(x[base + i]);
        dx[base + i] = from_float<T>(r * to_float(g[base + i]) * to_float(w[i]) - v * c);
    }
}

extern "C" __global__ void rms_norm_fwd_f32(const float *x, const float *w, float *y, int dim, float eps) {
    rms_norm_fwd(x, w, y, dim, eps);
}
extern "C" __global__ void rms_norm_fwd_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *w,
                                             __nv_bfloat16 *y, int dim, float eps) {
    rms_norm_fwd(x, w, y, dim, eps);
}
extern "C" __global__ void rms_norm_bwd_f32(const float *x, const float *g, const float *w, float *dx,
                                            int dim, float eps) {
    rms_norm_bwd(x, g, w, dx, dim, eps);
}
extern "C" __global__ void rms_norm_bwd_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *g,
                                             const __nv_bfloat16 *w, __nv_bfloat16 *dx, int dim,
                                             float eps) {
    rms_norm_bwd(x, g, w, dx, dim, eps);
}

// ---- Attention's softmax: the masking rule applied in place of an additive mask ----
//
// Scores `[b, kv_heads, group * t, s]` (s = past + t; the query heads of one key/value head
// stacked, `t` queries each): row r belongs to batch row r / rows_per_batch and query
// r % t. Query i sees key j when j <= past + i and, for packed rows (segments != NULL,
// past == 0), segments[b*t + j] == segments[b*t + i]: AttentionMask::allows.

__device__ float block_max(float v, float *shared) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = blockDim.x / 32;
    v = lane < warps ? shared[lane] : -INFINITY;
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

// probs = softmax(scale * scores) over the keys each query sees (0 elsewhere), in f32.
template <typename T>
__device__ void masked_softmax(const T *scores, T *probs, const uint32_t *segments, int t, int past,
                               int s, long long rows_per_batch, float scale) {
    __shared__ float shared[32];
    size_t r = blockIdx.x;
    const T *row = scores + r * s;
    T *out = probs + r * s;
    long long batch = (long long)r / rows_per_batch;
    int i = (int)(r % t);
    int last = past + i;
    uint32_t own = segments ? segments[batch * t + i] : 0;
    float m = -INFINITY;
    for (int j = threadIdx.x; j <= last && j < s; j += blockDim.x) {
        if (!segments || segments[batch * t + j] == own) m = fmaxf(m, to_float(row[j]) * scale);
    }
    m = block_max(m, shared);
    float sum = 0.0f;
    for (int j = threadIdx.x; j <= last && j < s; j += blockDim.x) {
        if (!segments || segments[batch * t + j] == own) sum += expf(to_float(row[j]) * scale - m);
    }
    float inv = 1.0f / block_sum(sum, shared);
    for (int j = threadIdx.x; j < s; j += blockDim.x) {
        bool seen = j <= last && (!segments || segments[batch * t + j] == own);
        out[j] = from_float<T>(seen ? expf(to_float(row[j]) * scale - m) * inv : 0.0f);
    }
}

// The gradient with respect to the scores: scale * p * (dp - sum(p * dp)) per row.
template <typename T>
__device__ void softmax_backward(const T *probs, const T *dprobs, T *dscores, int s, float scale) {
    __shared__ float shared[32];
    size_t base = (size_t)blockIdx.x * s;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < s; j += blockDim.x) dot += to_float(probs[base + j]) * to_float(dprobs[base + j]);
    dot = block_sum(dot, shared);
    for (int j = threadIdx.x; j < s; j += blockDim.x) {
        float p = to_float(probs[base + j]);
        dscores[base + j] = from_float<T>(scale * p * (to_float(dprobs[base + j]) - dot));
    }
}

extern "C" __global__ void masked_softmax_f32(const float *scores, float *probs, const uint32_t *segments,
                                              int t, int past, int s, long long rows_per_batch, float scale) {
    masked_softmax(scores, probs, segments, t, past, s, rows_per_batch, scale);
}
extern "C" __global__ void masked_softmax_bf16(const __nv_bfloat16 *scores, __nv_bfloat16 *probs,
                                               const uint32_t *segments, int t, int past, int s,
                                               long long rows_per_batch, float scale) {
    masked_softmax(scores, probs, segments, t, past, s, rows_per_batch, scale);
}
extern "C" __global__ void softmax_backward_f32(const float *probs, const float *dprobs, float *dscores, int s,
                                                float scale) {
    softmax_backward(probs, dprobs, dscores, s, scale);
}
extern "C" __global__ void softmax_backward_bf16(const __nv_bfloat16 *probs, const __nv_bfloat16 *dprobs,
                                                 __nv_bfloat16 *dscores, int s, float scale) {
    softmax_backward(probs, dprobs, dscores, s, scale);
}

// ---- SwiGLU's backward: the gradients of silu(gate) * up, in f32 ----
// d_gate = d * up * s * (1 + g * (1 - s)), d_up = d * g * s, with s = sigmoid(g); `out`
// holds d_gate in its first n elements and d_up in the next n.
template <typename T>
__device__ void swiglu_bwd(const T *gate, const T *up, const T *d, T *out, uint64_t n) {
    T *d_gate = out, *d_up = out + n;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        float g = to_float(gate[i]), u = to_float(up[i]), dy = to_float(d[i]);
        float s = 1.0f / (1.0f + expf(-g));
        d_up[i] = from_float<T>(dy * g * s);
        d_gate[i] = from_float<T>(dy * u * s * (1.0f + g * (1.0f - s)));
    }
}

extern "C" __global__ void swiglu_bwd_f32(const float *gate, const float *up, const float *d,
                                          float *out, uint64_t n) {
    swiglu_bwd(gate, up, d, out, n);
}
extern "C" __global__ void swiglu_bwd_bf16(const __nv_bfloat16 *gate, const __nv_bfloat16 *up,
                                           const __nv_bfloat16 *d, __nv_bfloat16 *out, uint64_t n) {
    swiglu_bwd(gate, up, d, out, n);
}

// ---- Cross-entropy of a chunk of logits: one block per row ----

// nll[r] = logsumexp(logits[r]) - logits[r][target[r]], and the gradient of the summed
// nll with respect to the logits, softmax(logits[r]) - onehot(target[r]), in f32: one
// pass for the running maximum and sum of exponentials, one to write the gradient.
template <typename T>
__device__ void cross_entropy(const T *logits, const uint32_t *targets, T *grad, float *nll, int vocab) {
    __shared__ float shared[32];
    size_t base = (size_t)blockIdx.x * vocab;
    float m = -INFINITY, s = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float x = to_float(logits[base + i]);
        if (x > m) {
            s = s * expf(m - x) + 1.0f;
            m = x;
        } else {
            s += expf(x - m);
        }
    }
    float row_max = block_max(m, shared);
    float sum = block_sum(s > 0.0f ? s * expf(m - row_max) : 0.0f, shared);
    float lse = row_max + logf(sum);
    uint32_t target = targets[blockIdx.x];
    if (threadIdx.x == 0) nll[blockIdx.x] = lse - to_float(logits[base + target]);
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float p = expf(to_float(logits[base + i]) - lse);
        grad[base + i] = from_float<T>(i == (int)target ? p - 1.0f : p);
    }
}

extern "C" __global__ void cross_entropy_f32(const float *logits, const uint32_t *targets, float *grad,
                                             float *nll, int vocab) {
    cross_entropy(logits, targets, grad, nll, vocab);
}
extern "C" __global__ void cross_entropy_bf16(const __nv_bfloat16 *logits, const uint32_t *targets,
                                              __nv_bfloat16 *grad, float *nll, int vocab) {
    cross_entropy(logits, targets, grad, nll, vocab);
}
