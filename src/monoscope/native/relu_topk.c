/* The CPU block AuxK's codes (monoscope.sae.topk): each row of a bf16 [rows, n] matrix of pre-activations, in place,
 * ReLU'd and cut to its k largest entries (a row with at most k positive entries keeps them all; ties at the k-th
 * value go to the lowest columns, as `_row_topk` breaks them).
 *
 * Why: the PyTorch form counted each row's positives, ReLU'd, gathered the rows holding more than k, took their top
 * k, zero-filled, scattered and copied them back: ~45 ms per step at 4,096 x 4,200 dead latents (a transcoder's
 * count), several passes and allocations of 34 MB each. A positive bf16's bits, read as an unsigned integer, order
 * as its values, so the k-th largest is found bit by bit with vectorised counting passes over the row. */
#include <stdint.h>

#include "parallel.h"

#define LANES 32

/* how many of row[0..n) are >= cand: LANES independent 16-bit counters (n <= 2^21), so the loop vectorises */
static inline int64_t count_ge(const uint16_t *row, int64_t n, uint16_t cand) {
    uint16_t acc[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += row[j + l] >= cand;
    int64_t c = 0;
    for (int l = 0; l < LANES; l++) c += acc[l];
    for (; j < n; j++) c += row[j] >= cand;
    return c;
}

static void relu_topk_row(uint16_t *row, int64_t n, int64_t k) {
    for (int64_t j = 0; j < n; j++) row[j] = (row[j] & 0x8000u) ? 0 : row[j]; /* negative (and -0) -> +0 */
    if (count_ge(row, n, 1) <= k) return;
    uint16_t t = 0;
    for (int bit = 14; bit >= 0; bit--) {
        const uint16_t cand = (uint16_t)(t | (1u << bit));
        if (count_ge(row, n, cand) >= k) t = cand;
    }
    int64_t equal_kept = k - (t == 0x7fffu ? 0 : count_ge(row, n, (uint16_t)(t + 1)));
    for (int64_t j = 0; j < n; j++) {
        const uint16_t v = row[j];
        if (v > t) continue;
        if (v == t && equal_kept > 0) {
            equal_kept--;
            continue;
        }
        row[j] = 0;
    }
}

/* Rows [0, n_rows) of x: [n_rows, n] bf16 bits, rows contiguous. */
void relu_topk_rows_bf16(uint16_t *x, int64_t n_rows, int64_t n, int64_t k) {
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (int64_t r = 0; r < n_rows; r++) relu_topk_row(x + r * n, n, k);
}
