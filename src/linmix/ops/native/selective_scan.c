/* Mamba-1 selective scans over a 2D token grid in several orders, summed (VMamba's cross-scan),
 * for CPU inference (see linmix/ops/native/__init__.py and linmix.ops.selective_scan).
 *
 * For one batch element, every tensor is in row-major GRID order (token p = h * width + w):
 *   u[p, c], y[p, c]                       layout [T, channels], contiguous
 *   delta[k, p, c]  at delta + k * delta_stride_dir + p * delta_stride_token + c, or, when dt_weight
 *     is given (the low-rank dt projection fused in), delta[k, p, c] = sum_r dt_weight[k, c, r] *
 *     low[k, p, r] with low[k, p, r] at delta + k * delta_stride_dir + p * delta_stride_token + r
 *   B[k, p, n], C[k, p, n]  at B + k * bc_stride_dir + p * bc_stride_token + n  (same strides for C)
 *   A[k, c, n] (A <= 0), skip[k, c] (or NULL), delta_bias[k, c] (or NULL),
 *   order[k, l]: the grid token that direction k visits at its l-th step (a permutation of 0..T-1;
 *   a table rather than index arithmetic: no division per step, and any order works).
 * Direction k visits the grid in its order; at its l-th step, token p = order[k, l]:
 *   dt    = softplus(delta[k, p] + delta_bias[k])      (softplus only when asked)
 *   h     = exp(dt * A[k]) * h + dt * u[p] * B[k, p]   (per channel c and state n; h starts at 0)
 *   y[p] += <h, C[k, p]> + skip[k] * u[p]
 * The directions' outputs are summed in place into y (the first one writes).
 *
 * Work order: channels [c0, c1) are cut into blocks of `block` channels; per block, direction after
 * direction runs over all T tokens with the block's state h[N][block] and A[N][block] held in L1
 * (channel-contiguous, so the inner loops over channels vectorise). The block's columns of u and y
 * (T * block floats each) stay in L2 from one direction to the next; delta, B and C are read once
 * (with the fused projection, delta is never formed: R multiply-adds per channel and step replace
 * a [K, T, channels] tensor written by a GEMM and read back here). The rows of the next steps are
 * prefetched from the order table.
 * No permuted copy of any tensor is made: the column-major orders just read rows `width` apart.
 *
 * Returns 0, or 1 when the work buffers cannot be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "fast_math.h"
#include "selective_scan_step.h"

/* log(1 + e) for e in [0, 1], branch-free and accurate for tiny e: 2 atanh(s) with s = e / (2 + e)
 * in [0, 1/3], odd series to s^15 (truncation below 1e-8 relative). */
static inline float log1p_unit(float e) {
    const float s = e / (2.0f + e), s2 = s * s;
    float p = 1.0f / 15.0f;
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

/* softplus(x) = max(x, 0) + log(1 + exp(-|x|)), exact for any x (no overflow, no threshold). */
static inline float softplus(float x) {
    const float negative_abs = x < 0.0f ? x : -x;
    return (x > 0.0f ? x : 0.0f) + log1p_unit(linmix_exp_nonpositive(negative_abs));
}

enum { MAX_BLOCK = 1024, PREFETCH_AHEAD = 8 };

int linmix_cross_selective_scan_f32(const float *restrict u, const float *restrict delta, const float *restrict dt_weight,
                                    const float *restrict A, const float *restrict B, const float *restrict C,
                                    const float *restrict skip, const float *restrict delta_bias,
                                    const int64_t *restrict order, float *restrict y, int64_t count, int64_t length,
                                    int64_t channels, int64_t state_size, int64_t rank, int64_t delta_stride_dir,
                                    int64_t delta_stride_token, int64_t bc_stride_dir, int64_t bc_stride_token,
                                    int64_t apply_softplus, int64_t c0, int64_t c1, int64_t block) {
    const int64_t N = state_size, R = dt_weight ? rank : 0;
    if (c1 <= c0 || length <= 0 || count <= 0) return 0;
    if (block <= 0 || block > MAX_BLOCK) block = MAX_BLOCK;
    /* h[N][block], A[N][block], then the block's dt_proj weight transposed, W[R][block] */
    float *state = malloc(sizeof(float) * (size_t)((2 * N + R) * block));
    if (!state) return 1;
    float *restrict h = state, *restrict a = state + N * block, *restrict w = state + 2 * N * block;
    float dt[MAX_BLOCK], du[MAX_BLOCK], acc[MAX_BLOCK], bias[MAX_BLOCK], d_skip[MAX_BLOCK];

    for (int64_t cb = c0; cb < c1; cb += block) {
        const int64_t nb = cb + block < c1 ? block : c1 - cb;
        const int64_t row_bytes = nb * (int64_t)sizeof(float);
        for (int64_t k = 0; k < count; ++k) {
            const int64_t *restrict order_k = order + k * length;
            for (int64_t n = 0; n < N; ++n)
                for (int64_t c = 0; c < nb; ++c) {
                    a[n * block + c] = A[(k * channels + cb + c) * N + n];
                    h[n * block + c] = 0.0f;
                }
            for (int64_t r = 0; r < R; ++r)
                for (int64_t c = 0; c < nb; ++c) w[r * block + c] = dt_weight[(k * channels + cb + c) * R + r];
            for (int64_t c = 0; c < nb; ++c) {
                bias[c] = delta_bias ? delta_bias[k * channels + cb + c] : 0.0f;
                d_skip[c] = skip ? skip[k * channels + cb + c] : 0.0f;
            }
            /* delta rows of the block, or (fused) the rows of the low-rank input dt_low[k, p, :R] */
            const float *restrict delta_k = delta + k * delta_stride_dir + (R ? 0 : cb);
            const float *restrict B_k = B + k * bc_stride_dir, *restrict C_k = C + k * bc_stride_dir;
            for (int64_t step = 0; step < length; ++step) {
                const int64_t p = order_k[step];
                if (step + PREFETCH_AHEAD < length) {
                    /* Rows `channels` apart (and `width` rows apart in the column orders) defeat the
                     * hardware prefetcher; the order table says which rows come next. */
                    const int64_t q = order_k[step + PREFETCH_AHEAD];
                    const char *uq = (const char *)(u + q * channels + cb), *yq = (const char *)(y + q * channels + cb);
                    const char *dq = (const char *)(delta_k + q * delta_stride_token);
                    for (int64_t offset = 0; offset < row_bytes; offset += 64) {
                        __builtin_prefetch(uq + offset, 0, 3);
                        __builtin_prefetch(yq + offset, 1, 3);
                    }
                    for (int64_t offset = 0; offset < (R ? R * (int64_t)sizeof(float) : row_bytes); offset += 64)
                        __builtin_prefetch(dq + offset, 0, 3);
                }
                const float *restrict dp = delta_k + p * delta_stride_token, *restrict up = u + p * channels + cb;
                const float *restrict bp = B_k + p * bc_stride_token, *restrict cp = C_k + p * bc_stride_token;
                if (R) { /* delta = W dt_low, never stored: R multiply-adds per channel from L1 */
                    for (int64_t c = 0; c < nb; ++c) dt[c] = bias[c];
                    for (int64_t r = 0; r < R; ++r) {
                        const float low = dp[r];
                        const float *restrict wr = w + r * block;
                        for (int64_t c = 0; c < nb; ++c) dt[c] += wr[c] * low;
                    }
                } else {
                    for (int64_t c = 0; c < nb; ++c) dt[c] = dp[c] + bias[c];
                }
                if (apply_softplus)
                    for (int64_t c = 0; c < nb; ++c) dt[c] = softplus(dt[c]);
                for (int64_t c = 0; c < nb; ++c) {
                    du[c] = dt[c] * up[c];
                    acc[c] = d_skip[c] * up[c];
                }
                linmix_selective_scan_token(h, a, dt, du, bp, cp, acc, N, nb, block);
                float *restrict yp = y + p * channels + cb;
                if (k == 0) {
                    for (int64_t c = 0; c < nb; ++c) yp[c] = acc[c];
                } else {
                    for (int64_t c = 0; c < nb; ++c) yp[c] += acc[c];
                }
            }
        }
    }
    free(state);
    return 0;
}
