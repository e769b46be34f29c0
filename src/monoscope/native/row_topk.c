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
 * The per-row search lives in row_topk.h, which screen_topk.c shares. */
#include <stdint.h>
#include <stdlib.h>

#include "parallel.h"
#include "row_topk.h"

#define DEFINE_ROW_TOPK(NAME, S, U, ROW)                                                            \
/* x: [n_rows, n] keys with row stride ld; writes out_v [n_rows, k] keys and out_i [n_rows, k] column indices. \
   Rows are split across n_threads threads (parallel.h), each with its own buffers. Returns 0, or -1 when memory  \
   runs out (the output is then incomplete). */                                                     \
int NAME(const S *x, int64_t n_rows, int64_t n, int64_t ld, int64_t k, S *out_v, int64_t *out_i) {  \
    int failed = 0;                                                                                 \
    _Pragma("omp parallel num_threads(n_threads) if (n_threads > 1)")                               \
    {                                                                                               \
        U *cmax = malloc((size_t)(n / GROUPS) * sizeof(U) + 1);                                     \
        U *cu = malloc((size_t)n * sizeof(U) + 1);                                                  \
        int64_t *ci = malloc((size_t)n * sizeof(int64_t) + 1);                                      \
        const int ok = cmax && cu && ci;                                                            \
        if (!ok) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);                                    \
        _Pragma("omp for schedule(static)")                                                         \
        for (int64_t r = 0; r < n_rows; r++)                                                        \
            if (ok) ROW(x + r * ld, n, k, cmax, cu, ci, out_v + r * k, out_i + r * k);             \
        free(cmax); free(cu); free(ci);                                                             \
    }                                                                                               \
    return failed ? -1 : 0;                                                                         \
}

DEFINE_ROW_TOPK(row_topk_i16, int16_t, uint16_t, topk_i16_row)
DEFINE_ROW_TOPK(row_topk_i32, int32_t, uint32_t, topk_i32_row)
