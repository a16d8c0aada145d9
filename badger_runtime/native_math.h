/* Math shared by badger's C kernels (built by badger_runtime/native.py, which puts this folder on the
 * include path and keys its build cache by this file's text too). */
#ifndef BADGER_NATIVE_MATH_H
#define BADGER_NATIVE_MATH_H
#include <math.h>
#include <stdint.h>

/* exp(x) for float32, vectorisable without -ffast-math: Cody-Waite range reduction and Cephes' degree-6
 * polynomial (~1 ulp). x is clamped to [-87, 87] first, so the GRU kernel's sigmoid saturates at 0 and 1 instead of
 * overflowing (the handcrafted policies drive gates with pre-activations in the thousands); a NaN stays a NaN. */
static inline float exp_clamped(float x) {
    x = x < -87.0f ? -87.0f : (x > 87.0f ? 87.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};  /* 2^n */
    return p * scale.f;
}

#endif
