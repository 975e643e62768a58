/* One token of a Mamba-1 selective scan for a block of channels, shared by the inference
 * (selective_scan.c) and training (selective_scan_train.c) kernels. */
#ifndef LINMIX_SELECTIVE_SCAN_STEP_H
#define LINMIX_SELECTIVE_SCAN_STEP_H

#include <stdint.h>

#include "fast_math.h"

/* For channels c < nb and states n < N (h, a: [N][block], channel-contiguous):
 *   h[n, c] = exp(dt[c] a[n, c]) h[n, c] + du[c] B[n],   acc[c] += h[n, c] C[n]
 * (du = dt * u). The inner loop runs over contiguous channels and vectorises. */
static inline void linmix_selective_scan_token(float *restrict h, const float *restrict a, const float *restrict dt,
                                               const float *restrict du, const float *restrict B,
                                               const float *restrict C, float *restrict acc, int64_t N,
                                               int64_t nb, int64_t block) {
    for (int64_t n = 0; n < N; ++n) {
        const float bn = B[n], cn = C[n];
        float *restrict hn = h + n * block;
        const float *restrict an = a + n * block;
        for (int64_t c = 0; c < nb; ++c) {
            const float next = linmix_exp_nonpositive(dt[c] * an[c]) * hn[c] + du[c] * bn;
            hn[c] = next;
            acc[c] += next * cn;
        }
    }
}

#endif
