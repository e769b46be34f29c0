/* bf16 <-> float32 as torch converts them (c10::BFloat16), and the bf16 dot product, for the kernels that read or
 * write bf16 tensors. */
#ifndef MONOSCOPE_BF16_H
#define MONOSCOPE_BF16_H

#include <stdint.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

/* exact: a bf16 is the top half of a float32 */
static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)h << 16;
    return x.f;
}

/* bf16 of x rounded to nearest even, as torch's conversion rounds it */
static inline uint16_t f32_to_bf16(float x) {
    union { float f; uint32_t u; } b = {x};
    if ((b.u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    return (uint16_t)((b.u + 0x7fffu + ((b.u >> 16) & 1u)) >> 16);
}

#define DOT_LANES 16

/* <a, b> over d bf16 entries, summed in float32 (entry_dots.c says how the sum is ordered) */
static inline float dot_bf16(const uint16_t *a, const uint16_t *b, int64_t d) {
    int64_t j = 0;
#if defined(__AVX512BF16__)
    /* vdpbf16ps: 32 products per instruction, each exact in float32 (8-bit mantissas), added pairwise into 16 lanes */
    __m512 vacc = _mm512_setzero_ps();
    for (; j + 32 <= d; j += 32)
        vacc = _mm512_dpbf16_ps(vacc, (__m512bh)_mm512_loadu_si512(a + j), (__m512bh)_mm512_loadu_si512(b + j));
    float head = _mm512_reduce_add_ps(vacc);
#else
    const float head = 0.f;
#endif
    float acc[DOT_LANES] = {0};
    for (; j + DOT_LANES <= d; j += DOT_LANES)
        for (int l = 0; l < DOT_LANES; l++) acc[l] += bf16_to_f32(a[j + l]) * bf16_to_f32(b[j + l]);
    float tail = 0.f;
    for (; j < d; j++) tail += bf16_to_f32(a[j]) * bf16_to_f32(b[j]);
    float t = 0.f;
    for (int l = 0; l < DOT_LANES; l++) t += acc[l];
    return head + t + tail;
}

#endif
