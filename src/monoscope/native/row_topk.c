/* Exact per-row top-k of integer keys: the order views of bf16 / float32 pre-activations (monoscope.sae.topk).
 *
 * Per row: the maximum of each column over GROUPS strided slices of the row (one vectorised pass over the row);
 * the k-th largest of those maxima, t0, by a bitwise search; at least k columns have a maximum >= t0, so at least k
 * entries of the row are >= t0 and every top-k entry is >= t0. The candidates are the row's entries
 * >= t0, found by a second vectorised pass over the row (still in L1) that compares 32 or 16 keys at once and
 * looks at the rare hits only (~k to 2k of them, against the k * GROUPS entries of the columns holding them, which
 * an earlier version gathered and searched one by one: on one Zen 4 core, 3.7 -> 1.1 us per row of 9,216 bf16 keys
 * held in cache; in a training step at 4,096 x 9,216, where the rows come from memory, 9.9 -> 6.8 ms); then a
 * bitwise search over the candidates, and one pass that keeps the entries above the k-th value and, in index order,
 * as many equal to it as are needed. Entries come out in increasing index order. Why not aten's top-k: on a CPU it
 * spends ~1 ns per element whatever k is; here the row is read twice from L1 and each pass is a vector compare.
 *
 * S: the signed key type; U: the unsigned type of the same width (keys are mapped to U keeping their order). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "parallel.h"

#define GROUPS 16

/* VEC_W: keys of W bits that one 512-bit compare takes (0 where the CPU has no such compare: the scalar loops do it
   all); GE_U_W / GE_S_W(p, t): the bit mask of the VEC_W keys at p that are >= t, unsigned / signed */
#if defined(__AVX512BW__)
#define VEC_16 32
#define GE_U_16(p, t) _mm512_cmpge_epu16_mask(_mm512_loadu_si512(p), _mm512_set1_epi16((short)(t)))
#define GE_S_16(p, t) _mm512_cmpge_epi16_mask(_mm512_loadu_si512(p), _mm512_set1_epi16(t))
#else
#define VEC_16 0
#define GE_U_16(p, t) 0u
#define GE_S_16(p, t) 0u
#endif
#if defined(__AVX512F__)
#define VEC_32 16
#define GE_U_32(p, t) _mm512_cmpge_epu32_mask(_mm512_loadu_si512(p), _mm512_set1_epi32((int)(t)))
#define GE_S_32(p, t) _mm512_cmpge_epi32_mask(_mm512_loadu_si512(p), _mm512_set1_epi32(t))
#else
#define VEC_32 0
#define GE_U_32(p, t) 0u
#define GE_S_32(p, t) 0u
#endif

#define DEFINE_KEY_SCANS(W)                                                                          \
/* how many of u[0..m) are >= cand (unsigned keys) */                                                \
static inline int64_t count_ge_u##W(const uint##W##_t *u, int64_t m, uint##W##_t cand) {             \
    int64_t c = 0, i = 0;                                                                            \
    for (; VEC_##W && i + VEC_##W <= m; i += VEC_##W) c += __builtin_popcount((uint32_t)GE_U_##W(u + i, cand)); \
    for (; i < m; i++) c += u[i] >= cand;                                                            \
    return c;                                                                                        \
}                                                                                                    \
/* the entries of row[0..n) whose key is >= t (signed), in index order: their unsigned keys (x ^ flip) into cu \
   and their columns into ci; returns how many */                                                    \
static inline int64_t scan_ge_i##W(const int##W##_t *row, int64_t n, int##W##_t t, uint##W##_t flip, \
                                   uint##W##_t *cu, int64_t *ci) {                                   \
    int64_t m = 0, j = 0;                                                                            \
    for (; VEC_##W && j + VEC_##W <= n; j += VEC_##W)                                                \
        for (uint32_t hit = (uint32_t)GE_S_##W(row + j, t); hit; hit &= hit - 1) {                   \
            const int64_t c = j + __builtin_ctz(hit);                                                \
            cu[m] = (uint##W##_t)row[c] ^ flip; ci[m] = c; m++;                                      \
        }                                                                                            \
    for (; j < n; j++)                                                                               \
        if (row[j] >= t) { cu[m] = (uint##W##_t)row[j] ^ flip; ci[m] = j; m++; }                     \
    return m;                                                                                        \
}

DEFINE_KEY_SCANS(16)
DEFINE_KEY_SCANS(32)

#define DEFINE_ROW_TOPK(NAME, S, U, COUNT_GE, SCAN_GE)                                              \
/* the k-th largest of u[0..m) (m >= k), and how many entries equal to it belong to the top k: bit by bit from \
   the top, the largest t with at least k entries >= t, each bit one vectorised counting pass (16 or 32 passes \
   over the n / GROUPS column maxima or the ~k candidates: ~5x faster than a byte-wise radix select, whose     \
   histogram updates are serial) */ \
static U NAME##_kth(const U *u, int64_t m, int64_t k, int64_t *n_equal) {                           \
    U t = 0;                                                                                        \
    for (int bit = 8 * (int)sizeof(U) - 1; bit >= 0; bit--) {                                       \
        const U cand = (U)(t | (U)((U)1 << bit));                                                   \
        if (COUNT_GE(u, m, cand) >= k) t = cand;                                                    \
    }                                                                                               \
    *n_equal = k - (t == (U)~(U)0 ? 0 : COUNT_GE(u, m, (U)(t + 1)));                                \
    return t;                                                                                       \
}                                                                                                   \
/* x: [n_rows, n] keys with row stride ld; writes out_v [n_rows, k] keys and out_i [n_rows, k] column indices. \
   Rows are split across n_threads threads (parallel.h), each with its own buffers. Returns 0, or -1 when memory  \
   runs out (the output is then incomplete). */                                                     \
int NAME(const S *x, int64_t n_rows, int64_t n, int64_t ld, int64_t k, S *out_v, int64_t *out_i) {  \
    const U flip = (U)((U)1 << (8 * sizeof(U) - 1)); /* signed -> unsigned, order kept */           \
    const int64_t cols = n / GROUPS;                                                                \
    const int grouped = n % GROUPS == 0 && cols >= 2 * k;                                           \
    int failed = 0;                                                                                 \
    _Pragma("omp parallel num_threads(n_threads) if (n_threads > 1)")                               \
    {                                                                                               \
        U *cmax = malloc((size_t)cols * sizeof(U) + 1);                                             \
        U *cu = malloc((size_t)n * sizeof(U) + 1);                                                  \
        int64_t *ci = malloc((size_t)n * sizeof(int64_t) + 1);                                      \
        const int ok = cmax && cu && ci;                                                            \
        if (!ok) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);                                    \
        _Pragma("omp for schedule(static)")                                                         \
        for (int64_t r = 0; r < n_rows; r++) {                                                      \
            if (!ok) continue;                                                                      \
            const S *row = x + r * ld;                                                              \
            int64_t m = 0;                                                                          \
            if (grouped) {                                                                          \
                for (int64_t c = 0; c < cols; c++) cmax[c] = (U)row[c] ^ flip;                      \
                for (int64_t g = 1; g < GROUPS; g++) {                                              \
                    const S *s = row + g * cols;                                                    \
                    for (int64_t c = 0; c < cols; c++) {                                            \
                        U v = (U)s[c] ^ flip;                                                       \
                        cmax[c] = v > cmax[c] ? v : cmax[c];                                        \
                    }                                                                               \
                }                                                                                   \
                int64_t unused;                                                                     \
                const U t0 = NAME##_kth(cmax, cols, k, &unused);                                    \
                m = SCAN_GE(row, n, (S)(t0 ^ flip), flip, cu, ci);  /* increasing index order */    \
            } else {                                                                                \
                for (int64_t j = 0; j < n; j++) { cu[j] = (U)row[j] ^ flip; ci[j] = j; }            \
                m = n;                                                                              \
            }                                                                                       \
            int64_t eq;                                                                             \
            U t = NAME##_kth(cu, m, k, &eq);                                                        \
            S *ov = out_v + r * k;                                                                  \
            int64_t *oi = out_i + r * k, o = 0;                                                     \
            for (int64_t j = 0; j < m && o < k; j++)                                                \
                if (cu[j] > t || (cu[j] == t && eq-- > 0)) { ov[o] = (S)(cu[j] ^ flip); oi[o] = ci[j]; o++; }\
        }                                                                                           \
        free(cmax); free(cu); free(ci);                                                             \
    }                                                                                               \
    return failed ? -1 : 0;                                                                         \
}

DEFINE_ROW_TOPK(row_topk_i16, int16_t, uint16_t, count_ge_u16, scan_ge_i16)
DEFINE_ROW_TOPK(row_topk_i32, int32_t, uint32_t, count_ge_u32, scan_ge_i32)
