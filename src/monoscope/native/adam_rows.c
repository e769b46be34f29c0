/* The CPU optimiser step of an SAE in two passes over each parameter (monoscope.train.fused_step).

   Pass 1, grad_sumsq: each row's squared gradient norm, after removing from a decoder row's gradient its
   component along the row (coef[r] = <g_r, w_r> / max(|w_r|^2, 1e-12), kept for pass 2).
   Pass 2, adam_rows: the gradient with that component removed and the clipping factor applied, torch's Adam
   (its CPU fused kernel's float32 arithmetic, operation for operation: the same results bit for bit), then a
   decoder row rescaled to unit norm while it is still in cache.

   Built with -ffp-contract=off: the compiler may not fuse a multiply and an add that torch rounds separately;
   fmaf marks the places where torch's build fuses them (its lerp, and the second moment's update: found by
   comparing every variant with torch 2.13's results). Rows are contiguous, `d` floats apart. */
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "parallel.h"

#define LANES 16

/* rowsq[r] = |g_r - coef[r] w_r|^2 (w != 0, coef filled) or |g_r|^2 (w == 0), for rows [0, n_rows). */
void grad_sumsq(const float *g, const float *w, float *coef, double *rowsq, int64_t n_rows, int64_t d) {
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (int64_t r = 0; r < n_rows; r++) {
        const float *gr = g + r * d;
        float c = 0.0f;
        if (w) {
            const float *wr = w + r * d;
            float gw[LANES] = {0}, ww[LANES] = {0};
            int64_t j = 0;
            for (; j + LANES <= d; j += LANES)
                for (int l = 0; l < LANES; l++) {
                    gw[l] += gr[j + l] * wr[j + l];
                    ww[l] += wr[j + l] * wr[j + l];
                }
            float dot = 0.0f, sq = 0.0f;
            for (int l = 0; l < LANES; l++) {
                dot += gw[l];
                sq += ww[l];
            }
            for (; j < d; j++) {
                dot += gr[j] * wr[j];
                sq += wr[j] * wr[j];
            }
            c = dot / fmaxf(sq, 1e-12f);
            coef[r] = c;
        }
        float acc[LANES] = {0};
        int64_t j = 0;
        if (w) {
            const float *wr = w + r * d;
            for (; j + LANES <= d; j += LANES)
                for (int l = 0; l < LANES; l++) {
                    float x = gr[j + l] - c * wr[j + l];
                    acc[l] += x * x;
                }
        } else {
            for (; j + LANES <= d; j += LANES)
                for (int l = 0; l < LANES; l++) acc[l] += gr[j + l] * gr[j + l];
        }
        double s = 0.0;
        for (int l = 0; l < LANES; l++) s += acc[l];
        for (; j < d; j++) {
            float x = w ? gr[j] - c * w[r * d + j] : gr[j];
            s += (double)(x * x);
        }
        rowsq[r] = s;
    }
}

/* Σ rowsq in index order: the same total whatever the threads' split of pass 1. */
double sum_f64(const double *x, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += x[i];
    return s;
}

/* One Adam step of rows [0, n_rows) of p (m: exp_avg, v: exp_avg_sq), with the gradient
   (g - coef[r] p_r) * clip (coef may be 0: no removal; clip 1: no scaling), and each updated row rescaled to unit
   norm when renorm. Scalars as torch's fused kernel rounds them: w1 = 1 - beta1, b2 = beta2, c2 = 1 - beta2,
   bc2s = sqrt(1 - beta2^step), neg_step = -lr / (1 - beta1^step), all float. bf (may be 0): the updated rows'
   bf16 copy, row r at bf + r * bf_ld, for the next forward's matmuls (written while the row is in cache). */
void adam_rows(float *p, const float *g, float *m, float *v, const float *coef, float clip, int64_t n_rows,
               int64_t d, float w1, float b2, float c2, float bc2s, float eps, float neg_step, int renorm,
               uint16_t *bf, int64_t bf_ld) {
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (int64_t r = 0; r < n_rows; r++) {
        float *pr = p + r * d, *mr = m + r * d, *vr = v + r * d;
        const float *gr = g + r * d;
        const float c = coef ? coef[r] : 0.0f;
        for (int64_t j = 0; j < d; j++) {
            float gj = gr[j];
            if (coef) gj = gj - c * pr[j];
            if (clip != 1.0f) gj = gj * clip;
            float mj = fmaf(w1, gj - mr[j], mr[j]);
            float vj = fmaf(c2 * gj, gj, vr[j] * b2);
            mr[j] = mj;
            vr[j] = vj;
            float den = sqrtf(vj) / bc2s + eps;
            pr[j] = pr[j] + neg_step * mj / den;
        }
        if (renorm) {
            float acc[LANES] = {0};
            int64_t j = 0;
            for (; j + LANES <= d; j += LANES)
                for (int l = 0; l < LANES; l++) acc[l] += pr[j + l] * pr[j + l];
            float sq = 0.0f;
            for (int l = 0; l < LANES; l++) sq += acc[l];
            for (; j < d; j++) sq += pr[j] * pr[j];
            float norm = fmaxf(sqrtf(sq), 1e-12f);
            for (j = 0; j < d; j++) pr[j] = pr[j] / norm;
        }
        if (bf) {
            uint16_t *br = bf + r * bf_ld;
            for (int64_t j = 0; j < d; j++) br[j] = f32_to_bf16(pr[j]);
        }
    }
}
