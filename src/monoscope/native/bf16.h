/* bf16 <-> float32 as torch converts them (c10::BFloat16), for the kernels that read or write bf16 tensors. */
#ifndef MONOSCOPE_BF16_H
#define MONOSCOPE_BF16_H

#include <stdint.h>

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

#endif
