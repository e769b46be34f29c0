/* The top-k of each row of the encoder's product x W^T + b, screened by an int8 product (monoscope.sae.topk).
 *
 * Why: on a CPU without AMX the bf16 product that only serves to choose each row's k largest pre-activations is
 * most of a TopK training step (~112 of ~156 ms at 4,096 x 576 -> 9,216 on a 2-core Zen 4, at that CPU's bf16
 * peak). AVX512-VNNI multiplies and adds int8 at twice the bf16 rate (vpdpbusd: 64 products per instruction
 * against vdpbf16ps's 32). So: each feature's weights are rounded to int8 with a scale of its own (screen_pack_w,
 * once per weight update), each row of x likewise (here), and the int8 product ranks the row's features; the m
 * best (m > k) are re-scored exactly, as bf16 dot products summed in float32 (the bias folded in, as the bf16
 * product computes them), and the k largest of those are the row's top k, with their exact values rounded to bf16.
 * An entry the screen ranks below m while its exact value is in the top k is missed: the rounding errors of the
 * screen must then exceed the gap between the k-th and the m-th largest value.
 *
 * Per block of ROWS rows, the int8 product of the block and all features goes into a buffer that stays in the
 * core's L2 (48 x 9,216 16-bit keys: 0.9 MB), and the top-m search reads it there, instead of a [B, F] matrix from
 * memory. The product's inner kernel keeps 6 rows x 64 features of int32 sums in 24 zmm registers (the scores are
 * made from them in a second loop: computed in the same loop, they pushed the sums out of their registers) and runs
 * at one vpdpbusd per cycle per core, ~0.9 int8 TOPS on a 2-core Zen 4 (benchmarks/screen_topk.py times the whole
 * screen). Without AVX512-VNNI the same arithmetic runs as plain C (same results, slow: "auto" does not choose the
 * screen there). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define SCREEN_VNNI 1
#else
#define SCREEN_VNNI 0
#endif

#include "bf16.h"
#include "parallel.h"
#include "row_topk.h"

#define NB 64  /* features per packed block: the inner kernel's 4 zmm of 16 int32 sums */
#define MR 6   /* rows of the inner kernel */
#define ROWS 48 /* rows per block: a multiple of MR */
#define AHEAD 4 /* candidates whose weight rows are prefetched ahead of use */

int screen_vnni(void) { return SCREEN_VNNI; }

/* features per block of the packed layout (the caller pads its per-feature arrays to whole blocks) */
int64_t screen_block(void) { return NB; }

static inline int64_t k4_of(int64_t d) { return (d + 3) / 4 * 4; }

/* q[0..d) = v / scale rounded to int8 (to nearest even, within +-127), scale = max |v| / 127 (0 for a row of 0s),
   v the d bf16 at row; tmp: d floats of scratch. Written as plain loops over arrays, which -O3 vectorises. */
static float quantize_row(const uint16_t *row, int64_t d, float *tmp, int8_t *q) {
    float amax = 0.f;
    for (int64_t j = 0; j < d; j++) tmp[j] = bf16_to_f32(row[j]);
#if defined(__AVX512F__)
    __m512 vmax = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(tmp + j)));
    amax = _mm512_reduce_max_ps(vmax);
    for (; j < d; j++) amax = fabsf(tmp[j]) > amax ? fabsf(tmp[j]) : amax;
#else
    for (int64_t j = 0; j < d; j++) amax = fabsf(tmp[j]) > amax ? fabsf(tmp[j]) : amax;
#endif
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t j = 0; j < d; j++) {
        float v = nearbyintf(tmp[j] * inv);
        v = v > 127.f ? 127.f : v;
        v = v < -127.f ? -127.f : v;
        q[j] = (int8_t)(int32_t)v;
    }
    return amax / 127.f;
}

/* bytes of the packed weights for n_feat features of d inputs */
int64_t screen_packed_bytes(int64_t n_feat, int64_t d) { return (n_feat + NB - 1) / NB * NB * k4_of(d); }

/* w: [n_feat, ld] bf16 rows, their first d entries the weights and, when with_bias, entry d the bias. Writes each
   feature's scale (max |w| / 127), its bias as float (0 without), and packed: the weights rounded to int8 and
   offset by 128 (vpdpbusd's unsigned operand), laid out [block of NB features][d / 4][NB][4], so one 64-byte load
   holds 4 inputs of 16 features; features past n_feat in the last block are 0. Packs the blocks [block_lo,
   block_hi) of the (n_feat + 63) / 64. Returns 0, or -1 when memory runs out. */
int screen_pack_w(const uint16_t *w, int64_t n_feat, int64_t d, int64_t ld, int with_bias, uint8_t *packed,
                  float *scale, float *bias, int64_t block_lo, int64_t block_hi) {
    const int64_t k4 = k4_of(d);
    int failed = 0;
    #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
        float *tmp = malloc((size_t)d * sizeof(float) + 4);
        int8_t *q = malloc((size_t)k4 + 4);
        #pragma omp for schedule(static)
        for (int64_t b = block_lo; b < block_hi; b++) {
            uint8_t *blk = packed + b * k4 * NB;
            for (int64_t l = 0; l < NB; l++) {
                const int64_t f = b * NB + l;
                if (!tmp || !q) { __atomic_store_n(&failed, 1, __ATOMIC_RELAXED); break; }
                if (f >= n_feat) { /* features past the end: 0s */
                    for (int64_t g = 0; g < k4 / 4; g++) memset(blk + g * NB * 4 + l * 4, 128, 4);
                    scale[f] = bias[f] = 0.f;
                    continue;
                }
                const uint16_t *row = w + f * ld;
                memset(q + d, 0, (size_t)(k4 - d));
                scale[f] = quantize_row(row, d, tmp, q);
                bias[f] = with_bias ? bf16_to_f32(row[d]) : 0.f;
                for (int64_t g = 0; g < k4 / 4; g++) { /* 4 inputs of the feature, offset by 128 (a sign flip) */
                    uint32_t four;
                    memcpy(&four, q + 4 * g, 4);
                    four ^= 0x80808080u;
                    memcpy(blk + g * NB * 4 + l * 4, &four, 4);
                }
            }
        }
        free(tmp); free(q);
    }
    return failed ? -1 : 0;
}

/* The screen's scores of MR rows (int8 a [MR][k4]) and the NB features of the packed block b, as the bf16 order
   view of sx[i] * scale[f] * (a_i . w_f) + bias[f] truncated to 16 bits (a ranking; the exact values come later)
   into c [MR][NB] (row stride ldc). off[i]: what the weights' offset of 128 added to row i's sums. */
static void product_block(const int8_t *a, const uint8_t *b, int64_t k4, const float *sx, const int32_t *off,
                          const float *scale, const float *bias, int16_t *c, int64_t ldc) {
    int32_t t[MR * NB] __attribute__((aligned(64)));
#if SCREEN_VNNI
#define ACC(i) __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
    ACC(0) ACC(1) ACC(2) ACC(3) ACC(4) ACC(5)
#undef ACC
    for (int64_t g = 0; g < k4 / 4; g++) {
        const uint8_t *bg = b + g * NB * 4;
        const __m512i b0 = _mm512_loadu_si512(bg), b1 = _mm512_loadu_si512(bg + 64),
                      b2 = _mm512_loadu_si512(bg + 128), b3 = _mm512_loadu_si512(bg + 192);
#define ROW(i) { const __m512i x = _mm512_set1_epi32(*(const int32_t *)(a + (i) * k4 + g * 4));                  \
        c##i##0 = _mm512_dpbusd_epi32(c##i##0, b0, x); c##i##1 = _mm512_dpbusd_epi32(c##i##1, b1, x);           \
        c##i##2 = _mm512_dpbusd_epi32(c##i##2, b2, x); c##i##3 = _mm512_dpbusd_epi32(c##i##3, b3, x); }
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
#define STORE(i) _mm512_storeu_si512(t + (i) * NB, c##i##0); _mm512_storeu_si512(t + (i) * NB + 16, c##i##1); \
    _mm512_storeu_si512(t + (i) * NB + 32, c##i##2); _mm512_storeu_si512(t + (i) * NB + 48, c##i##3);
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
#undef STORE
#else
    for (int i = 0; i < MR; i++)
        for (int l = 0; l < NB; l++) {
            int32_t sum = 0;
            for (int64_t j = 0; j < k4; j++) sum += (int32_t)b[(j / 4) * NB * 4 + l * 4 + j % 4] * a[i * k4 + j];
            t[i * NB + l] = sum;
        }
#endif
    /* the sums (in L1) to scores and keys: written as plain loops, which -O3 vectorises; in the loop above they
       spilled the accumulators out of their registers */
    for (int i = 0; i < MR; i++)
        for (int l = 0; l < NB; l++) {
            const float v = (float)(t[i * NB + l] - off[i]) * (scale[l] * sx[i]) + bias[l];
            int32_t bits;
            memcpy(&bits, &v, 4);
            c[i * ldc + l] = (int16_t)(bits >> 16);
        }
}

/* x: [n_rows, ldx] bf16 rows; its first d entries are screened against the packed weights (screen_pack_w of the
   same d; scale and bias padded to whole blocks), and its first d_dot entries are dotted exactly with the rows of w
   ([n_feat, ldw] bf16; d_dot = d + 1 with the bias column and x's column of ones). Writes each row's k largest exact
   values (bf16 bits: the bf16 order view) into out_v [n_rows, k] and their features into out_i, in increasing
   feature order, ties at the k-th value to the lowest features, from the m best of the screen (k <= m <= n_feat).
   Returns 0, or -1 when memory runs out. */
int screen_topk_bf16(const uint16_t *x, int64_t n_rows, int64_t ldx, int64_t d, const uint8_t *packed,
                     const float *scale, const float *bias, const uint16_t *w, int64_t ldw, int64_t d_dot,
                     int64_t n_feat, int64_t m, int64_t k, int16_t *out_v, int64_t *out_i) {
    const int64_t k4 = k4_of(d), n_blocks = (n_feat + NB - 1) / NB, width = n_blocks * NB;
    const int64_t n_row_blocks = (n_rows + ROWS - 1) / ROWS;
    int failed = 0;
    #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
        int8_t *xq = aligned_alloc(64, (size_t)(ROWS * k4 + 64));
        float *tmp = malloc((size_t)d * sizeof(float) + 4);
        int16_t *keys = aligned_alloc(64, (size_t)(ROWS * width) * 2);
        uint16_t *cmax = malloc((size_t)(width / GROUPS + 1) * 2), *cu = malloc((size_t)width * 2);
        int64_t *ci = malloc((size_t)width * 8);
        int16_t *cand_v = malloc((size_t)m * 2), *exact = malloc((size_t)m * 2);
        int64_t *cand_i = malloc((size_t)m * 8), *local = malloc((size_t)k * 8);
        const int ok = xq && tmp && keys && cmax && cu && ci && cand_v && exact && cand_i && local;
        if (!ok) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
        #pragma omp for schedule(static)
        for (int64_t rb = 0; rb < n_row_blocks; rb++) {
            if (!ok) continue;
            const int64_t r0 = rb * ROWS, nr = n_rows - r0 < ROWS ? n_rows - r0 : ROWS;
            float sx[ROWS];
            int32_t off[ROWS];
            memset(xq, 0, (size_t)(ROWS * k4));
            for (int64_t i = 0; i < ROWS; i++) {
                sx[i] = 0.f; off[i] = 0;
                if (i >= nr) continue;
                sx[i] = quantize_row(x + (r0 + i) * ldx, d, tmp, xq + i * k4);
                int32_t sum = 0;
                for (int64_t j = 0; j < d; j++) sum += xq[i * k4 + j];
                off[i] = 128 * sum;
            }
            const int64_t n_mr = (nr + MR - 1) / MR;
            for (int64_t b = 0; b < n_blocks; b++)
                for (int64_t i = 0; i < n_mr; i++)
                    product_block(xq + i * MR * k4, packed + b * k4 * NB, k4, sx + i * MR, off + i * MR,
                                  scale + b * NB, bias + b * NB, keys + i * MR * width + b * NB, width);
            for (int64_t i = 0; i < nr; i++) {
                const int64_t r = r0 + i;
                topk_i16_row(keys + i * width, n_feat, m, cmax, cu, ci, cand_v, cand_i);
                const uint16_t *xr = x + r * ldx;
                for (int64_t j = 0; j < m; j++) {
                    if (j + AHEAD < m) {
                        const char *p = (const char *)(w + cand_i[j + AHEAD] * ldw);
                        for (int64_t q = 0; q < d_dot * 2; q += 64) __builtin_prefetch(p + q);
                    }
                    exact[j] = (int16_t)f32_to_bf16(dot_bf16(xr, w + cand_i[j] * ldw, d_dot));
                }
                topk_i16_row(exact, m, k, cmax, cu, ci, out_v + r * k, local);
                for (int64_t o = 0; o < k; o++) out_i[r * k + o] = cand_i[local[o]];
            }
        }
        free(xq); free(tmp); free(keys); free(cmax); free(cu); free(ci); free(cand_v); free(exact); free(cand_i);
        free(local);
    }
    return failed ? -1 : 0;
}
