/* Vectorisable exp and sigmoid for the native kernels (no libm call, so loops over channels
 * vectorise without -ffast-math, which would also assume away the -inf of masked keys). */
#ifndef LINMIX_FAST_MATH_H
#define LINMIX_FAST_MATH_H

#include <stdint.h>
#include <string.h>

/* exp(x) for x <= 0 (also -inf), to about 2 ulp in float: x = n ln2 + r with |r| <= ln2 / 2, a
 * degree-7 Taylor polynomial for exp(r) (truncation 2e-9 relative), 2^n put in the exponent bits.
 * Results below exp(-86) (including x = -inf) are 0: 2^n then stays a normal float. */
static inline float linmix_exp_nonpositive(float x) {
    const float lowest = -86.0f, round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float xc = x < lowest ? lowest : x;
    const float shifted = xc * 1.44269504088896341f + round_magic;
    const float n = shifted - round_magic;
    const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723e-6f; /* ln 2 in two parts */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t shifted_bits, magic_bits, p_bits;
    memcpy(&shifted_bits, &shifted, 4);
    memcpy(&magic_bits, &round_magic, 4);
    memcpy(&p_bits, &p, 4);
    p_bits += (shifted_bits - magic_bits) * (1 << 23); /* times 2^n, n in [-124, 0] */
    float result;
    memcpy(&result, &p_bits, 4);
    return x < lowest ? 0.0f : result;
}

/* 1 / (1 + exp(-x)) without overflow: from e = exp(-|x|) <= 1. NaN stays NaN. */
static inline float linmix_sigmoid(float x) {
    const float e = linmix_exp_nonpositive(x < 0.0f ? x : -x);
    const float inverse = 1.0f / (1.0f + e);
    return x < 0.0f ? e * inverse : inverse;
}

#endif
