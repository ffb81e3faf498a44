/* Fused elementwise steps of the Llama layer for CPU, float32, built by cpu_ops.py.
 *
 * Why: in a CPU decode step each of these is several small torch ops (a dispatch, a
 * temporary and a pass over memory each); per layer they cost more than attention.
 * Compiled without -ffast-math and with -ffp-contract=off, so every product and sum is
 * rounded as torch rounds it: rotary embedding is bit-identical to the torch path; RMSNorm
 * differs only in the order its sum of squares is added up, SiLU in exp's last bits.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* glibc declares expf's vector variants (libmvec, within 4 ulp; torch's own vectorized
 * exp is not exact either) only under -ffast-math; declared here for SiLU alone. */
__attribute__((__simd__("notinbranch"))) float expf(float);

/* x (rows, hidden) += delta (if not NULL), then
 * out = weight * (x * 1 / sqrt(mean(x^2) + eps)), Hugging Face's LlamaRMSNorm in float32. */
void add_rms_norm_f32(float* x, const float* delta, const float* weight, float* out,
                      int64_t rows, int64_t hidden, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        float* xr = x + r * hidden;
        if (delta != NULL) {
            const float* dr = delta + r * hidden;
#pragma omp simd
            for (int64_t i = 0; i < hidden; i++) xr[i] += dr[i];
        }
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < hidden; i++) sum += xr[i] * xr[i];
        const float inv_rms = 1.f / sqrtf(sum / (float)hidden + eps);
        float* orow = out + r * hidden;
#pragma omp simd
        for (int64_t i = 0; i < hidden; i++) orow[i] = weight[i] * (xr[i] * inv_rms);
    }
}

/* qkv (tokens, row_stride) holds each token's q heads, k heads and v heads, head_dim
 * apart. Rotates q and k in place (x * cos + rotate_half(x) * sin with the token's cos, sin
 * rows, both (tokens, head_dim)) and stores k and v at slot_mapping[t] of one layer's
 * paged cache kv (2, num_slots, num_kv_heads, head_dim). */
void rotary_store_kv_f32(float* qkv, int64_t row_stride, const float* cos_rows,
                         const float* sin_rows, int64_t tokens,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float* kv,
                         int64_t num_slots, const int64_t* slot_mapping) {
    const int64_t half = head_dim / 2, kv_row = num_kv_heads * head_dim;
#pragma omp parallel for if (tokens >= 256)
    for (int64_t t = 0; t < tokens; t++) {
        float* row = qkv + t * row_stride;
        const float* cos = cos_rows + t * head_dim;
        const float* sin = sin_rows + t * head_dim;
        for (int64_t h = 0; h < num_heads + num_kv_heads; h++) {
            float* x = row + h * head_dim;
            float rotated[head_dim];
            for (int64_t d = 0; d < half; d++) {
                rotated[d] = x[d] * cos[d] + (-x[d + half]) * sin[d];
                rotated[d + half] = x[d + half] * cos[d + half] + x[d] * sin[d + half];
            }
            memcpy(x, rotated, sizeof(float) * head_dim);
        }
        const int64_t slot = slot_mapping[t];
        memcpy(kv + slot * kv_row, row + num_heads * head_dim, sizeof(float) * kv_row);
        memcpy(kv + (num_slots + slot) * kv_row, row + (num_heads + num_kv_heads) * head_dim,
               sizeof(float) * kv_row);
    }
}

/* gate_up (rows, 2 * inter): each row's gate then up halves. out (rows, inter), contiguous:
 * silu(gate) * up, with silu(g) = g / (1 + exp(-g)) as torch computes it. */
void silu_mul_f32(const float* gate_up, int64_t rows, int64_t inter, float* out) {
    for (int64_t r = 0; r < rows; r++) {
        const float* gate = gate_up + r * 2 * inter;
        const float* up = gate + inter;
        float* o = out + r * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) o[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
    }
}
