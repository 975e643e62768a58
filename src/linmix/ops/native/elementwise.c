/* Elementwise steps of the Vision-RWKV channel mix, in place, one pass each (see __init__.py):
 * where torch needs two ops and a temporary (relu then square; sigmoid then multiply). */
#include <stdint.h>

#include "fast_math.h"

/* x = max(x, 0)^2 over [begin, end). */
void linmix_relu_square_f32(float *restrict x, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
        const float r = x[i] > 0.0f ? x[i] : 0.0f;
        x[i] = r * r;
    }
}

/* y = sigmoid(gate) * y over [begin, end). */
void linmix_sigmoid_mul_f32(const float *restrict gate, float *restrict y, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) y[i] *= linmix_sigmoid(gate[i]);
}
