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

// keyed_dropout_f32 of a bf16 input, written in f32: the adapters' dropped input without an
// f32 copy of it first (bf16 to f32 is exact, so the values are the f32 kernel's).
extern "C" __global__ void keyed_dropout_bf16_f32(const __nv_bfloat16 *in, float *out, uint64_t n,
                                                  uint64_t base, float p, float keep) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        out[i] = dropped(base, i, p) ? 0.0f : __bfloat162float(in[i]) * keep;
    }
}

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

// ---- Flash attention: FlashAttention-2's algorithm on mma.sync, bf16, head width 64 or 128 ----
//
// Layouts as in src/model/attention.rs: q and the output `[b, kv_heads, group × t, D]` (the
// query heads of one key/value head stacked, t rows each), k and v `[b, kv_heads, t, D]`,
// all contiguous; `lse` holds one f32 per query row, in log2 units of the scaled scores
// (`scale · log2(e) · q·k`). Masking is the rule of AttentionMask::allows with no cached
// positions: key j is seen by query i when j <= i and, for packed rows, their segment ids
// agree. `first[i]` (the first position of i's segment) and `last[j]` (the last position of
// j's segment) bound the blocks a query or key block must visit; NULL means causal only.
//
// Each warp owns 16 rows of a 64-row tile; scores and accumulators stay in the mma
// fragments' registers (row `lane/4` and `lane/4 + 8`, columns `2·(lane%4)` and `+1` of
// each 8-wide tile), and a score tile becomes the next product's A operand without
// leaving registers. Shared tiles are padded by 8 elements a row, so that the fragment
// loads of 8 rows fall in different banks.

typedef __nv_bfloat16 bf16;

#define FLASH_ROWS 64

__device__ __forceinline__ uint32_t pack_floats(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

__device__ __forceinline__ uint32_t pack_pair(bf16 lo, bf16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// c += a · b for a 16×16 A, a 16×8 B (bf16) and a 16×8 f32 accumulator.
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void load_matrices(uint32_t r[4], const bf16 *p) {
    uint32_t address = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

__device__ __forceinline__ void load_matrices_transposed(uint32_t r[4], const bf16 *p) {
    uint32_t address = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// Fragments by ldmatrix: lanes 8·i to 8·i + 7 name the rows of 8 × 8 matrix i, which lands
// in register i of every lane in the mma layout.
//
// The A fragment of rows [row, row + 16) and columns [col, col + 16) of a row-major tile:
// matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
__device__ __forceinline__ void a_fragment(uint32_t a[4], const bf16 *tile, int stride, int row,
                                           int col, int lane) {
    load_matrices(a, tile + (row + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + col + (lane >> 4) * 8);
}

// The B fragments (k16 × n8) of n-tiles n and n + 8 of a tile stored n-major (`tile[n][k]`:
// keys for q·kᵀ): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
__device__ __forceinline__ void b_fragments_nk(uint32_t b0[2], uint32_t b1[2], const bf16 *tile,
                                               int stride, int n, int k, int lane) {
    uint32_t r[4];
    load_matrices(r, tile + (n + (lane & 7) + (lane >> 4) * 8) * stride + k + ((lane >> 3) & 1) * 8);
    b0[0] = r[0];
    b0[1] = r[1];
    b1[0] = r[2];
    b1[1] = r[3];
}

// The B fragments (k16 × n8) of n-tiles n and n + 8 of a tile stored k-major (`tile[k][n]`:
// values for p·v), transposed on the way: matrices (k 0-7, n 0-7), (k 8-15, n 0-7),
// (k 0-7, n 8-15), (k 8-15, n 8-15).
__device__ __forceinline__ void b_fragments_kn(uint32_t b0[2], uint32_t b1[2], const bf16 *tile,
                                               int stride, int k, int n, int lane) {
    uint32_t r[4];
    load_matrices_transposed(r, tile + (k + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + n + (lane >> 4) * 8);
    b0[0] = r[0];
    b0[1] = r[1];
    b1[0] = r[2];
    b1[1] = r[3];
}

// Whether a tile pair needs no mask: every key before every query, no row past t, and (for
// packed rows) both tiles inside one segment (`tiles`: a tile's segment id, or all ones when
// it holds several).
__device__ __forceinline__ bool unmasked(int i0, int j0, int t, const uint32_t *tiles, int batch) {
    if (j0 + FLASH_ROWS > i0 || i0 + FLASH_ROWS > t) return false;
    if (!tiles) return true;
    int per_row = (t + FLASH_ROWS - 1) / FLASH_ROWS;
    uint32_t a = tiles[batch * per_row + i0 / FLASH_ROWS], b = tiles[batch * per_row + j0 / FLASH_ROWS];
    return a == b && a != 0xFFFFFFFFu;
}

// Accumulator tiles 2·kk and 2·kk + 1 (16 × 16) as the A operand of the next product.
__device__ __forceinline__ void a_from_accumulators(uint32_t a[4], const float lo[4],
                                                    const float hi[4]) {
    a[0] = pack_floats(lo[0], lo[1]);
    a[1] = pack_floats(lo[2], lo[3]);
    a[2] = pack_floats(hi[0], hi[1]);
    a[3] = pack_floats(hi[2], hi[3]);
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffff, v, 1);
    return v + __shfl_xor_sync(0xffffffff, v, 2);
}

// Copies rows [row0, row0 + 64) of a row-major `[t, D]` matrix into a padded shared tile,
// zeros past row t.
template <int D>
__device__ __forceinline__ void load_rows(bf16 *tile, const bf16 *src, int row0, int t) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks a row
    for (int c = threadIdx.x; c < FLASH_ROWS * CHUNKS; c += blockDim.x) {
        int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        uint4 value = make_uint4(0, 0, 0, 0);
        if (row0 + r < t) value = *reinterpret_cast<const uint4 *>(src + (size_t)(row0 + r) * D + col);
        *reinterpret_cast<uint4 *>(tile + r * (D + 8) + col) = value;
    }
}

template <int D>
__device__ void flash_forward(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse,
                              const uint32_t *segments, const uint32_t *first,
                              const uint32_t *tiles, int t, int group, int kv_heads,
                              float scale_log2) {
    constexpr int P = D + 8, TILE = FLASH_ROWS * P;
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    bf16 *sq = reinterpret_cast<bf16 *>(shared_bytes), *sk = sq + TILE, *sv = sk + TILE;
    uint32_t *key_segments = reinterpret_cast<uint32_t *>(sv + TILE);
    __shared__ int key_start;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane >> 2, tig = lane & 3;
    const int block = gridDim.x - 1 - blockIdx.x;  // the blocks with the most keys first
    const int g = blockIdx.y, bh = blockIdx.z, batch = bh / kv_heads;
    const int i0 = block * FLASH_ROWS;
    const size_t head_row = (size_t)(bh * group + g) * t;
    const bf16 *kh = k + (size_t)bh * t * D, *vh = v + (size_t)bh * t * D;
    const uint32_t *seg = segments ? segments + (size_t)batch * t : nullptr;
    if (threadIdx.x == 0) key_start = first ? i0 : 0;
    __syncthreads();
    if (first) {
        for (int r = threadIdx.x; r < FLASH_ROWS && i0 + r < t; r += blockDim.x)
            atomicMin(&key_start, (int)first[(size_t)batch * t + i0 + r]);
    }
    load_rows<D>(sq, q + head_row * D, i0, t);
    __syncthreads();

    const int r0 = i0 + warp * 16 + gid, r1 = r0 + 8;
    const uint32_t seg0 = (seg && r0 < t) ? seg[r0] : 0, seg1 = (seg && r1 < t) ? seg[r1] : 0;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    const int last_key = min(t - 1, i0 + FLASH_ROWS - 1);
    for (int j0 = (key_start / FLASH_ROWS) * FLASH_ROWS; j0 <= last_key; j0 += FLASH_ROWS) {
        __syncthreads();  // every warp is done with the previous tiles
        load_rows<D>(sk, kh, j0, t);
        load_rows<D>(sv, vh, j0, t);
        if (threadIdx.x < FLASH_ROWS)
            key_segments[threadIdx.x] = (seg && j0 + (int)threadIdx.x < t) ? seg[j0 + threadIdx.x] : 0;
        __syncthreads();
        float s[FLASH_ROWS / 8][4];
#pragma unroll
        for (int n = 0; n < FLASH_ROWS / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            uint32_t a[4];
            a_fragment(a, sq, P, warp * 16, kk, lane);
#pragma unroll
            for (int n = 0; n < FLASH_ROWS / 8; n += 2) {
                uint32_t b0[2], b1[2];
                b_fragments_nk(b0, b1, sk, P, n * 8, kk, lane);
                mma_16816(s[n], a, b0);
                mma_16816(s[n + 1], a, b1);
            }
        }
        if (unmasked(i0, j0, t, tiles, batch)) {
#pragma unroll
            for (int n = 0; n < FLASH_ROWS / 8; ++n)
                for (int e = 0; e < 4; ++e) s[n][e] *= scale_log2;
        } else {
#pragma unroll
            for (int n = 0; n < FLASH_ROWS / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int j = j0 + n * 8 + tig * 2 + (e & 1);
                    int row = e < 2 ? r0 : r1;
                    uint32_t own = e < 2 ? seg0 : seg1;
                    bool seen = j <= row && j < t && (!seg || key_segments[j - j0] == own);
                    s[n][e] = seen ? s[n][e] * scale_log2 : -INFINITY;
                }
            }
        }
        float max0 = m0, max1 = m1;
#pragma unroll
        for (int n = 0; n < FLASH_ROWS / 8; ++n) {
            max0 = fmaxf(max0, fmaxf(s[n][0], s[n][1]));
            max1 = fmaxf(max1, fmaxf(s[n][2], s[n][3]));
        }
        max0 = quad_max(max0);
        max1 = quad_max(max1);
        float c0 = max0 == -INFINITY ? 1.0f : exp2f(m0 - max0);
        float c1 = max1 == -INFINITY ? 1.0f : exp2f(m1 - max1);
        m0 = max0;
        m1 = max1;
        float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
        for (int n = 0; n < FLASH_ROWS / 8; ++n) {
            s[n][0] = m0 == -INFINITY ? 0.0f : exp2f(s[n][0] - m0);
            s[n][1] = m0 == -INFINITY ? 0.0f : exp2f(s[n][1] - m0);
            s[n][2] = m1 == -INFINITY ? 0.0f : exp2f(s[n][2] - m1);
            s[n][3] = m1 == -INFINITY ? 0.0f : exp2f(s[n][3] - m1);
            sum0 += s[n][0] + s[n][1];
            sum1 += s[n][2] + s[n][3];
        }
        l0 = l0 * c0 + sum0;
        l1 = l1 * c1 + sum1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            acc[n][0] *= c0;
            acc[n][1] *= c0;
            acc[n][2] *= c1;
            acc[n][3] *= c1;
        }
#pragma unroll
        for (int kk = 0; kk < FLASH_ROWS / 16; ++kk) {
            uint32_t a[4];
            a_from_accumulators(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                uint32_t b0[2], b1[2];
                b_fragments_kn(b0, b1, sv, P, kk * 16, n * 8, lane);
                mma_16816(acc[n], a, b0);
                mma_16816(acc[n + 1], a, b1);
            }
        }
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    bf16 *oh = o + head_row * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        int col = n * 8 + tig * 2;
        if (r0 < t)
            *reinterpret_cast<uint32_t *>(oh + (size_t)r0 * D + col) = pack_floats(acc[n][0] * inv0, acc[n][1] * inv0);
        if (r1 < t)
            *reinterpret_cast<uint32_t *>(oh + (size_t)r1 * D + col) = pack_floats(acc[n][2] * inv1, acc[n][3] * inv1);
    }
    if (tig == 0) {
        if (r0 < t) lse[head_row + r0] = l0 > 0.0f ? m0 + log2f(l0) : 0.0f;
        if (r1 < t) lse[head_row + r1] = l1 > 0.0f ? m1 + log2f(l1) : 0.0f;
    }
}

// delta[r] = Σ_d dO[r][d] · O[r][d], one warp per row (the backward pass's rowsum(dO ∘ O)).
extern "C" __global__ void flash_delta_bf16(const bf16 *o, const bf16 *d_o, float *delta, long long rows, int dim) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    int lane = threadIdx.x % 32;
    float sum = 0.0f;
    for (int d = lane; d < dim; d += 32)
        sum += __bfloat162float(o[row * dim + d]) * __bfloat162float(d_o[row * dim + d]);
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, offset);
    if (lane == 0) delta[row] = sum;
}

// dq = scale · dS·k with dS = P ∘ (dP − delta), P = exp2(scale_log2 · q·kᵀ − lse), dP = dO·vᵀ:
// one block per 64 query rows of one head, walking the key tiles its rows see.
template <int D>
__device__ void flash_dq(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *d_o,
                         const float *lse, const float *delta, bf16 *dq, const uint32_t *segments,
                         const uint32_t *first, const uint32_t *tiles, int t, int group,
                         int kv_heads, float scale_log2, float scale) {
    constexpr int P = D + 8, TILE = FLASH_ROWS * P, HALF = FLASH_ROWS / 2;
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    bf16 *sq = reinterpret_cast<bf16 *>(shared_bytes), *sdo = sq + TILE, *sk = sdo + TILE,
         *sv = sk + TILE;
    uint32_t *key_segments = reinterpret_cast<uint32_t *>(sv + TILE);
    __shared__ int key_start;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane >> 2, tig = lane & 3;
    const int block = gridDim.x - 1 - blockIdx.x;
    const int g = blockIdx.y, bh = blockIdx.z, batch = bh / kv_heads;
    const int i0 = block * FLASH_ROWS;
    const size_t head_row = (size_t)(bh * group + g) * t;
    const bf16 *kh = k + (size_t)bh * t * D, *vh = v + (size_t)bh * t * D;
    const uint32_t *seg = segments ? segments + (size_t)batch * t : nullptr;
    if (threadIdx.x == 0) key_start = first ? i0 : 0;
    __syncthreads();
    if (first) {
        for (int r = threadIdx.x; r < FLASH_ROWS && i0 + r < t; r += blockDim.x)
            atomicMin(&key_start, (int)first[(size_t)batch * t + i0 + r]);
    }
    load_rows<D>(sq, q + head_row * D, i0, t);
    load_rows<D>(sdo, d_o + head_row * D, i0, t);
    __syncthreads();

    const int r0 = i0 + warp * 16 + gid, r1 = r0 + 8;
    const uint32_t seg0 = (seg && r0 < t) ? seg[r0] : 0, seg1 = (seg && r1 < t) ? seg[r1] : 0;
    const float lse0 = r0 < t ? lse[head_row + r0] : 0.0f, lse1 = r1 < t ? lse[head_row + r1] : 0.0f;
    const float delta0 = r0 < t ? delta[head_row + r0] : 0.0f,
                delta1 = r1 < t ? delta[head_row + r1] : 0.0f;
    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    const int last_key = min(t - 1, i0 + FLASH_ROWS - 1);
    for (int j0 = (key_start / FLASH_ROWS) * FLASH_ROWS; j0 <= last_key; j0 += FLASH_ROWS) {
        __syncthreads();
        load_rows<D>(sk, kh, j0, t);
        load_rows<D>(sv, vh, j0, t);
        if (threadIdx.x < FLASH_ROWS)
            key_segments[threadIdx.x] = (seg && j0 + (int)threadIdx.x < t) ? seg[j0 + threadIdx.x] : 0;
        __syncthreads();
        const bool plain = unmasked(i0, j0, t, tiles, batch);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int k0 = half * HALF;
            float s[HALF / 8][4], dp[HALF / 8][4];
#pragma unroll
            for (int n = 0; n < HALF / 8; ++n)
                for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D; kk += 16) {
                uint32_t a[4], a_do[4];
                a_fragment(a, sq, P, warp * 16, kk, lane);
                a_fragment(a_do, sdo, P, warp * 16, kk, lane);
#pragma unroll
                for (int n = 0; n < HALF / 8; n += 2) {
                    uint32_t b0[2], b1[2];
                    b_fragments_nk(b0, b1, sk, P, k0 + n * 8, kk, lane);
                    mma_16816(s[n], a, b0);
                    mma_16816(s[n + 1], a, b1);
                    b_fragments_nk(b0, b1, sv, P, k0 + n * 8, kk, lane);
                    mma_16816(dp[n], a_do, b0);
                    mma_16816(dp[n + 1], a_do, b1);
                }
            }
            if (plain) {
#pragma unroll
                for (int n = 0; n < HALF / 8; ++n) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float p = exp2f(s[n][e] * scale_log2 - (e < 2 ? lse0 : lse1));
                        s[n][e] = p * (dp[n][e] - (e < 2 ? delta0 : delta1));
                    }
                }
            } else {
#pragma unroll
                for (int n = 0; n < HALF / 8; ++n) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        int jj = k0 + n * 8 + tig * 2 + (e & 1), j = j0 + jj;
                        int row = e < 2 ? r0 : r1;
                        bool seen = j <= row && j < t && row < t &&
                                    (!seg || key_segments[jj] == (e < 2 ? seg0 : seg1));
                        float p = seen ? exp2f(s[n][e] * scale_log2 - (e < 2 ? lse0 : lse1)) : 0.0f;
                        s[n][e] = p * (dp[n][e] - (e < 2 ? delta0 : delta1));
                    }
                }
            }
#pragma unroll
            for (int kk = 0; kk < HALF / 16; ++kk) {
                uint32_t a[4];
                a_from_accumulators(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
                for (int n = 0; n < D / 8; n += 2) {
                    uint32_t b0[2], b1[2];
                    b_fragments_kn(b0, b1, sk, P, k0 + kk * 16, n * 8, lane);
                    mma_16816(acc[n], a, b0);
                    mma_16816(acc[n + 1], a, b1);
                }
            }
        }
    }
    bf16 *out = dq + head_row * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        int col = n * 8 + tig * 2;
        if (r0 < t)
            *reinterpret_cast<uint32_t *>(out + (size_t)r0 * D + col) = pack_floats(acc[n][0] * scale, acc[n][1] * scale);
        if (r1 < t)
            *reinterpret_cast<uint32_t *>(out + (size_t)r1 * D + col) = pack_floats(acc[n][2] * scale, acc[n][3] * scale);
    }
}

// dk = scale · dSᵀ·q and dv = Pᵀ·dO for 64 keys of one key/value head, summed over the query
// heads of its group and the query tiles that see the keys.
template <int D>
__device__ void flash_dkdv(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *d_o,
                           const float *lse, const float *delta, bf16 *dk, bf16 *dv,
                           const uint32_t *segments, const uint32_t *last, const uint32_t *tiles,
                           int t, int group, int kv_heads, float scale_log2, float scale) {
    constexpr int P = D + 8, TILE = FLASH_ROWS * P, HALF = FLASH_ROWS / 2;
    extern __shared__ __align__(16) unsigned char shared_bytes[];
    bf16 *sk = reinterpret_cast<bf16 *>(shared_bytes), *sv = sk + TILE, *sq = sv + TILE,
         *sdo = sq + TILE;
    float *row_lse = reinterpret_cast<float *>(sdo + TILE), *row_delta = row_lse + FLASH_ROWS;
    uint32_t *row_segments = reinterpret_cast<uint32_t *>(row_delta + FLASH_ROWS);
    __shared__ int query_end;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane >> 2, tig = lane & 3;
    const int bh = blockIdx.z, batch = bh / kv_heads;
    const int j0 = blockIdx.x * FLASH_ROWS;  // key tile 0 is seen by the most queries: first
    const bf16 *kh = k + (size_t)bh * t * D, *vh = v + (size_t)bh * t * D;
    const uint32_t *seg = segments ? segments + (size_t)batch * t : nullptr;
    if (threadIdx.x == 0) query_end = last ? j0 : t - 1;
    __syncthreads();
    if (last) {
        for (int r = threadIdx.x; r < FLASH_ROWS && j0 + r < t; r += blockDim.x)
            atomicMax(&query_end, (int)last[(size_t)batch * t + j0 + r]);
    }
    load_rows<D>(sk, kh, j0, t);
    load_rows<D>(sv, vh, j0, t);
    __syncthreads();

    const int key0 = j0 + warp * 16 + gid, key1 = key0 + 8;
    const uint32_t kseg0 = (seg && key0 < t) ? seg[key0] : 0, kseg1 = (seg && key1 < t) ? seg[key1] : 0;
    float acc_k[D / 8][4], acc_v[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
        for (int e = 0; e < 4; ++e) acc_k[n][e] = acc_v[n][e] = 0.0f;
    const int end = min(query_end, t - 1);
    for (int h = 0; h < group; ++h) {
        const size_t head_row = (size_t)(bh * group + h) * t;
        for (int i0 = j0; i0 <= end; i0 += FLASH_ROWS) {
            __syncthreads();
            load_rows<D>(sq, q + head_row * D, i0, t);
            load_rows<D>(sdo, d_o + head_row * D, i0, t);
            if (threadIdx.x < FLASH_ROWS) {
                int i = i0 + threadIdx.x;
                row_lse[threadIdx.x] = i < t ? lse[head_row + i] : 0.0f;
                row_delta[threadIdx.x] = i < t ? delta[head_row + i] : 0.0f;
                row_segments[threadIdx.x] = (seg && i < t) ? seg[i] : 0;
            }
            __syncthreads();
            // Keys j0.. before queries i0.. when i0 > j0: the pair as (queries, keys).
            const bool plain = unmasked(i0, j0, t, tiles, batch) && j0 + FLASH_ROWS <= t;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int q0 = half * HALF;
                float s[HALF / 8][4], dp[HALF / 8][4];
#pragma unroll
                for (int n = 0; n < HALF / 8; ++n)
                    for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < D; kk += 16) {
                    uint32_t a_k[4], a_v[4];
                    a_fragment(a_k, sk, P, warp * 16, kk, lane);
                    a_fragment(a_v, sv, P, warp * 16, kk, lane);
#pragma unroll
                    for (int n = 0; n < HALF / 8; n += 2) {
                        uint32_t b0[2], b1[2];
                        b_fragments_nk(b0, b1, sq, P, q0 + n * 8, kk, lane);
                        mma_16816(s[n], a_k, b0);
                        mma_16816(s[n + 1], a_k, b1);
                        b_fragments_nk(b0, b1, sdo, P, q0 + n * 8, kk, lane);
                        mma_16816(dp[n], a_v, b0);
                        mma_16816(dp[n + 1], a_v, b1);
                    }
                }
                // s and dp are transposed: rows are keys, columns queries.
                if (plain) {
#pragma unroll
                    for (int n = 0; n < HALF / 8; ++n) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            int ii = q0 + n * 8 + tig * 2 + (e & 1);
                            float p = exp2f(s[n][e] * scale_log2 - row_lse[ii]);
                            s[n][e] = p;
                            dp[n][e] = p * (dp[n][e] - row_delta[ii]);
                        }
                    }
                } else {
#pragma unroll
                    for (int n = 0; n < HALF / 8; ++n) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            int ii = q0 + n * 8 + tig * 2 + (e & 1), i = i0 + ii;
                            int key = e < 2 ? key0 : key1;
                            bool seen = key <= i && i < t && key < t &&
                                        (!seg || row_segments[ii] == (e < 2 ? kseg0 : kseg1));
                            float p = seen ? exp2f(s[n][e] * scale_log2 - row_lse[ii]) : 0.0f;
                            s[n][e] = p;
                            dp[n][e] = p * (dp[n][e] - row_delta[ii]);
                        }
                    }
                }
#pragma unroll
                for (int kk = 0; kk < HALF / 16; ++kk) {
                    uint32_t a_p[4], a_ds[4];
                    a_from_accumulators(a_p, s[2 * kk], s[2 * kk + 1]);
                    a_from_accumulators(a_ds, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
                    for (int n = 0; n < D / 8; n += 2) {
                        uint32_t b0[2], b1[2];
                        b_fragments_kn(b0, b1, sdo, P, q0 + kk * 16, n * 8, lane);
                        mma_16816(acc_v[n], a_p, b0);
                        mma_16816(acc_v[n + 1], a_p, b1);
                        b_fragments_kn(b0, b1, sq, P, q0 + kk * 16, n * 8, lane);
                        mma_16816(acc_k[n], a_ds, b0);
                        mma_16816(acc_k[n + 1], a_ds, b1);
                    }
                }
            }
        }
    }
    bf16 *out_k = dk + (size_t)bh * t * D, *out_v = dv + (size_t)bh * t * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        int col = n * 8 + tig * 2;
        if (key0 < t) {
            *reinterpret_cast<uint32_t *>(out_k + (size_t)key0 * D + col) = pack_floats(acc_k[n][0] * scale, acc_k[n][1] * scale);
            *reinterpret_cast<uint32_t *>(out_v + (size_t)key0 * D + col) = pack_floats(acc_v[n][0], acc_v[n][1]);
        }
        if (key1 < t) {
            *reinterpret_cast<uint32_t *>(out_k + (size_t)key1 * D + col) = pack_floats(acc_k[n][2] * scale, acc_k[n][3] * scale);
            *reinterpret_cast<uint32_t *>(out_v + (size_t)key1 * D + col) = pack_floats(acc_v[n][2], acc_v[n][3]);
        }
    }
}

#define FLASH_KERNELS(D)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) flash_forward_d##D(                         \
        const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, const uint32_t *segments, \
        const uint32_t *first, const uint32_t *tiles, int t, int group, int kv_heads,              \
        float scale_log2) {                                                                        \
        flash_forward<D>(q, k, v, o, lse, segments, first, tiles, t, group, kv_heads, scale_log2); \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_dq_d##D(                              \
        const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *d_o, const float *lse,            \
        const float *delta, bf16 *dq, const uint32_t *segments, const uint32_t *first,             \
        const uint32_t *tiles, int t, int group, int kv_heads, float scale_log2, float scale) {    \
        flash_dq<D>(q, k, v, d_o, lse, delta, dq, segments, first, tiles, t, group, kv_heads,      \
                    scale_log2, scale);                                                            \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_dkdv_d##D(                            \
        const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *d_o, const float *lse,            \
        const float *delta, bf16 *dk, bf16 *dv, const uint32_t *segments, const uint32_t *last,   \
        const uint32_t *tiles, int t, int group, int kv_heads, float scale_log2, float scale) {    \
        flash_dkdv<D>(q, k, v, d_o, lse, delta, dk, dv, segments, last, tiles, t, group, kv_heads, \
                      scale_log2, scale);                                                          \
    }

FLASH_KERNELS(64)
FLASH_KERNELS(128)

// out = bf16(base + delta): an f32 adapter term added to a bf16 value with one rounding, as
// PyTorch adds an f32 LoRA delta to a bf16 projection (no bf16 copy of the delta first).
extern "C" __global__ void add_f32_to_bf16(const __nv_bfloat16 *base, const float *delta,
                                           __nv_bfloat16 *out, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)blockDim.x * gridDim.x) {
        out[i] = __float2bfloat16(__bfloat162float(base[i]) + delta[i]);
    }
}
