/* Exact per-row top-k of integer keys: the order views of bf16 / float32 pre-activations (monoscope.sae.topk).
 *
 * Per row: the maximum of each column over GROUPS strided slices of the row (one vectorised pass over the row);
 * the k-th largest of those maxima, t0, by a bitwise search; every top-k entry lies in a column whose
 * maximum is >= t0, so the answer is the top k of those columns' entries: a second search over them, then
 * one pass that keeps the entries above the k-th value and, in index order, as many equal to it as are needed.
 * Entries come out in increasing index order. Why not aten's top-k: on a CPU it spends ~1 ns per element whatever
 * k is; here the row is read once and only ~k * GROUPS candidates are looked at twice.
 *
 * S: the signed key type; U: the unsigned type of the same width (keys are mapped to U keeping their order). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"

#define GROUPS 16

#define DEFINE_ROW_TOPK(NAME, S, U)                                                                 \
/* the k-th largest of u[0..m) (m >= k), and how many entries equal to it belong to the top k: bit by bit from \
   the top, the largest t with at least k entries >= t, each bit one vectorised counting pass (16 or 32 passes \
   over ~k * GROUPS keys: ~5x faster than a byte-wise radix select, whose histogram updates are serial) */ \
static U NAME##_kth(const U *u, int64_t m, int64_t k, int64_t *n_equal) {                           \
    U t = 0;                                                                                        \
    for (int bit = 8 * (int)sizeof(U) - 1; bit >= 0; bit--) {                                      \
        const U cand = (U)(t | (U)((U)1 << bit));                                                   \
        int32_t c = 0;                                                                              \
        for (int64_t i = 0; i < m; i++) c += u[i] >= cand;                                          \
        if (c >= k) t = cand;                                                                       \
    }                                                                                               \
    int32_t above = 0;                                                                              \
    for (int64_t i = 0; i < m; i++) above += u[i] > t;                                              \
    *n_equal = k - above;                                                                           \
    return t;                                                                                       \
}                                                                                                   \
/* x: [n_rows, n] keys with row stride ld; writes out_v [n_rows, k] keys and out_i [n_rows, k] column indices. \
   Rows are split across n_threads threads (parallel.h), each with its own buffers. Returns 0, or -1 when memory  \
   runs out (the output is then incomplete). */                                                    \
int NAME(const S *x, int64_t n_rows, int64_t n, int64_t ld, int64_t k, S *out_v, int64_t *out_i) { \
    const U flip = (U)((U)1 << (8 * sizeof(U) - 1)); /* signed -> unsigned, order kept */            \
    const int64_t cols = n / GROUPS;                                                                \
    const int grouped = n % GROUPS == 0 && cols >= 2 * k;                                           \
    int failed = 0;                                                                                 \
    _Pragma("omp parallel num_threads(n_threads) if (n_threads > 1)")                               \
    {                                                                                               \
        U *cmax = malloc((size_t)cols * sizeof(U) + 1);                                             \
        int64_t *best = malloc((size_t)cols * sizeof(int64_t) + 1);                                 \
        U *cu = malloc((size_t)n * sizeof(U) + 1);                                                  \
        int64_t *ci = malloc((size_t)n * sizeof(int64_t) + 1);                                      \
        const int ok = cmax && best && cu && ci;                                                    \
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
                int64_t unused, nb = 0;                                                             \
                U t0 = NAME##_kth(cmax, cols, k, &unused);                                          \
                for (int64_t c = 0; c < cols; c++)                                                  \
                    if (cmax[c] >= t0) best[nb++] = c;                                              \
                for (int64_t g = 0; g < GROUPS; g++)  /* increasing index order: g * cols + c */    \
                    for (int64_t b = 0; b < nb; b++) {                                              \
                        int64_t j = g * cols + best[b];                                             \
                        cu[m] = (U)row[j] ^ flip; ci[m] = j; m++;                                   \
                    }                                                                               \
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
        free(cmax); free(best); free(cu); free(ci);                                                 \
    }                                                                                               \
    return failed ? -1 : 0;                                                                         \
}

DEFINE_ROW_TOPK(row_topk_i16, int16_t, uint16_t)
DEFINE_ROW_TOPK(row_topk_i32, int32_t, uint32_t)
