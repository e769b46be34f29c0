/* The per-row top-k of integer keys that row_topk.c and screen_topk.c share: row_topk.c says how it works.
 * S: the signed key type; U: the unsigned type of the same width (keys are mapped to U keeping their order). */
#ifndef MONOSCOPE_ROW_TOPK_H
#define MONOSCOPE_ROW_TOPK_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

#define DEFINE_TOPK_ROW(NAME, S, U, COUNT_GE, SCAN_GE)                                              \
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
/* the k largest of row[0..n) (0 < k <= n) into ov (keys) and oi (columns), in increasing column order, ties at \
   the k-th value to the lowest columns; cmax [n / GROUPS], cu [n] and ci [n]: the caller's scratch */ \
static void NAME##_row(const S *row, int64_t n, int64_t k, U *cmax, U *cu, int64_t *ci, S *ov, int64_t *oi) { \
    const U flip = (U)((U)1 << (8 * sizeof(U) - 1)); /* signed -> unsigned, order kept */           \
    const int64_t cols = n / GROUPS;                                                                \
    int64_t m = 0;                                                                                  \
    if (n % GROUPS == 0 && cols >= 2 * k) {                                                         \
        for (int64_t c = 0; c < cols; c++) cmax[c] = (U)row[c] ^ flip;                              \
        for (int64_t g = 1; g < GROUPS; g++) {                                                      \
            const S *s = row + g * cols;                                                            \
            for (int64_t c = 0; c < cols; c++) {                                                    \
                U v = (U)s[c] ^ flip;                                                               \
                cmax[c] = v > cmax[c] ? v : cmax[c];                                                \
            }                                                                                       \
        }                                                                                           \
        int64_t unused;                                                                             \
        const U t0 = NAME##_kth(cmax, cols, k, &unused);                                            \
        m = SCAN_GE(row, n, (S)(t0 ^ flip), flip, cu, ci);  /* increasing index order */            \
    } else {                                                                                        \
        for (int64_t j = 0; j < n; j++) { cu[j] = (U)row[j] ^ flip; ci[j] = j; }                    \
        m = n;                                                                                      \
    }                                                                                               \
    int64_t eq;                                                                                     \
    U t = NAME##_kth(cu, m, k, &eq);                                                                \
    int64_t o = 0;                                                                                  \
    for (int64_t j = 0; j < m && o < k; j++)                                                        \
        if (cu[j] > t || (cu[j] == t && eq-- > 0)) { ov[o] = (S)(cu[j] ^ flip); oi[o] = ci[j]; o++; } \
}

DEFINE_TOPK_ROW(topk_i16, int16_t, uint16_t, count_ge_u16, scan_ge_i16)
DEFINE_TOPK_ROW(topk_i32, int32_t, uint32_t, count_ge_u32, scan_ge_i32)

#endif
