/* Decode attention read straight out of the paged KV cache, for CPU, in float32.
 *
 * Built and loaded by cpu_kernel.py (gcc -O3 -march=native -fopenmp); called
 * through ctypes with the tensors' data pointers. Why a kernel: on CPU, decode attention
 * is memory-bound, and the torch path either gathers every request's context into a
 * padded tensor per layer per step or keeps a second, contiguous copy of it
 * (dense_decode.py). This reads each request's blocks once, in place.
 *
 * Layout (all contiguous, float32 unless said):
 *   q      (batch, num_heads, head_dim), rows `q_row_stride` floats apart
 *   kv     one layer's paged cache (2, num_blocks, block_size, num_kv_heads, head_dim):
 *          keys, then values
 *   block_tables (batch, max_blocks) int64; seq_lens (batch,) int64, >= 1, the context
 *          including the new token (already written to the cache)
 *   out    (batch, num_heads, head_dim), rows `out_row_stride` floats apart
 * Query head qh reads kv head qh / (num_heads / num_kv_heads) (grouped-query attention).
 *
 * One task per request, so its blocks are read whole and in order. Per request: scores for
 * every head (q . k * scale), a softmax per head (max subtracted, over real keys only),
 * then the probability-weighted sum of values. Arithmetic differs from torch's SDPA only in
 * summation order and exp's last bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* glibc declares expf's vector variants (libmvec, within 4 ulp; torch's own vectorized
 * exp is not exact either) only under -ffast-math, which must not be used: linking with
 * it sets flush-to-zero for the whole process that loads the library. */
__attribute__((__simd__("notinbranch"))) float expf(float);

static inline float dot(const float* a, const float* b, int64_t n) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < n; d++) acc += a[d] * b[d];
    return acc;
}

/* The next block's bytes into cache while this one is computed on. */
static inline void prefetch_block(const float* block, int64_t num_floats) {
    const char* p = (const char*)block;
    for (int64_t off = 0; off < num_floats * 4; off += 64) __builtin_prefetch(p + off);
}

/* Each of the `rows` rows of `scores` (rows, len) becomes its softmax. */
static void softmax_rows(float* scores, int64_t rows, int64_t len) {
    for (int64_t row = 0; row < rows; row++) {
        float* s = scores + row * len;
        float max = s[0];
#pragma omp simd reduction(max : max)
        for (int64_t j = 1; j < len; j++) max = s[j] > max ? s[j] : max;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < len; j++) {
            s[j] = expf(s[j] - max);
            sum += s[j];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t j = 0; j < len; j++) s[j] *= inv;
    }
}

static void attend_one(const float* q, const float* keys, const float* values,
                       const int64_t* table, int64_t len, float* out, float* scores,
                       int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                       int64_t block_size, float scale) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t block_stride = block_size * token_stride;
    for (int64_t j0 = 0; j0 < len; j0 += block_size) {  /* scores (num_heads, len) */
        const float* block = keys + table[j0 / block_size] * block_stride;
        if (j0 + block_size < len) prefetch_block(keys + table[j0 / block_size + 1] * block_stride,
                                                  block_stride);
        const int64_t n = len - j0 < block_size ? len - j0 : block_size;
        for (int64_t t = 0; t < n; t++) {
            for (int64_t qh = 0; qh < num_heads; qh++) {
                const float* k = block + t * token_stride + (qh / group) * head_dim;
                scores[qh * len + j0 + t] = dot(q + qh * head_dim, k, head_dim) * scale;
            }
        }
    }
    softmax_rows(scores, num_heads, len);
    for (int64_t qh = 0; qh < num_heads; qh++) memset(out + qh * head_dim, 0, 4 * head_dim);
    for (int64_t j0 = 0; j0 < len; j0 += block_size) {  /* out = probabilities @ values */
        const float* block = values + table[j0 / block_size] * block_stride;
        if (j0 + block_size < len) prefetch_block(
            values + table[j0 / block_size + 1] * block_stride, block_stride);
        const int64_t n = len - j0 < block_size ? len - j0 : block_size;
        for (int64_t t = 0; t < n; t++) {
            for (int64_t qh = 0; qh < num_heads; qh++) {
                const float* v = block + t * token_stride + (qh / group) * head_dim;
                const float p = scores[qh * len + j0 + t];
                float* o = out + qh * head_dim;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) o[d] += p * v[d];
            }
        }
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* The same arithmetic with AVX-512 registers, for head_dim = 16 * NC: one kv head's
 * queries are held in registers while its keys stream by (scores), and one query head's
 * output accumulates in registers over each block's values. */
static inline __attribute__((always_inline)) void attend_one_avx512(
    const int NC, const float* q, const float* keys, const float* values,
    const int64_t* table, int64_t len, float* out, float* scores, int64_t num_heads,
    int64_t num_kv_heads, int64_t block_size, float scale) {
    const int64_t head_dim = 16 * NC, group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    const int64_t block_stride = block_size * token_stride;
    for (int64_t j0 = 0; j0 < len; j0 += block_size) {
        const float* block = keys + table[j0 / block_size] * block_stride;
        if (j0 + block_size < len) prefetch_block(keys + table[j0 / block_size + 1] * block_stride,
                                                  block_stride);
        const int64_t n = len - j0 < block_size ? len - j0 : block_size;
        for (int64_t qh = 0; qh < num_heads; qh++) {
            __m512 qv[8];
            for (int c = 0; c < NC; c++) qv[c] = _mm512_loadu_ps(q + qh * head_dim + 16 * c);
            const float* k = block + (qh / group) * head_dim;
            float* s = scores + qh * len + j0;
            for (int64_t t = 0; t < n; t++, k += token_stride) {
                __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
                for (int c = 1; c < NC; c++)
                    acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + 16 * c), acc);
                s[t] = _mm512_reduce_add_ps(acc) * scale;
            }
        }
    }
    softmax_rows(scores, num_heads, len);
    for (int64_t qh = 0; qh < num_heads; qh++) memset(out + qh * head_dim, 0, 4 * head_dim);
    for (int64_t j0 = 0; j0 < len; j0 += block_size) {
        const float* block = values + table[j0 / block_size] * block_stride;
        if (j0 + block_size < len) prefetch_block(
            values + table[j0 / block_size + 1] * block_stride, block_stride);
        const int64_t n = len - j0 < block_size ? len - j0 : block_size;
        for (int64_t qh = 0; qh < num_heads; qh++) {
            __m512 acc[8];
            float* o = out + qh * head_dim;
            for (int c = 0; c < NC; c++) acc[c] = _mm512_loadu_ps(o + 16 * c);
            const float* v = block + (qh / group) * head_dim;
            const float* p = scores + qh * len + j0;
            for (int64_t t = 0; t < n; t++, v += token_stride) {
                const __m512 weight = _mm512_set1_ps(p[t]);
                for (int c = 0; c < NC; c++)
                    acc[c] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(v + 16 * c), acc[c]);
            }
            for (int c = 0; c < NC; c++) _mm512_storeu_ps(o + 16 * c, acc[c]);
        }
    }
}
#endif

/* Returns 0, or -1 when a scratch buffer could not be allocated (out is then partial). */
int paged_decode_attention_f32(const float* q, int64_t q_row_stride, const float* kv,
                               int64_t num_blocks, const int64_t* block_tables,
                               int64_t max_blocks, const int64_t* seq_lens, float* out,
                               int64_t out_row_stride, int64_t batch, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                               float scale, int num_threads) {
    const float* values = kv + num_blocks * block_size * num_kv_heads * head_dim;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(| : failed)
    for (int64_t b = 0; b < batch; b++) {
        float* scores = (float*)malloc(sizeof(float) * num_heads * seq_lens[b]);
        if (scores == NULL) {
            failed = 1;
            continue;
        }
        const float* qb = q + b * q_row_stride;
        const int64_t* table = block_tables + b * max_blocks;
        float* ob = out + b * out_row_stride;
#if defined(__AVX512F__)
        if (head_dim == 64)
            attend_one_avx512(4, qb, kv, values, table, seq_lens[b], ob, scores, num_heads,
                              num_kv_heads, block_size, scale);
        else if (head_dim == 128)
            attend_one_avx512(8, qb, kv, values, table, seq_lens[b], ob, scores, num_heads,
                              num_kv_heads, block_size, scale);
        else
#endif
            attend_one(qb, kv, values, table, seq_lens[b], ob, scores, num_heads, num_kv_heads,
                       head_dim, block_size, scale);
        free(scores);
    }
    return failed ? -1 : 0;
}
