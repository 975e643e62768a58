/* Mamba-1 selective scan, one direction, forward and backward, for CPU training (see
 * linmix/ops/native/__init__.py and linmix.ops.selective_scan_native).
 *
 * For one batch element (every pointer below is already offset to it):
 *   u[t, c], delta[t, c], y[t, c]    layout [T, channels], contiguous (delta: the step size, already
 *                                    biased and softplus'd, >= 0)
 *   A[c, n] (A <= 0)                 layout [channels, N]
 *   B[t, n], C[t, n]                 layout [T, N]
 *   h0[c, n], h_final[c, n]          layout [channels, N] (h0 may be NULL: a zero start)
 * Per token t, channel c and state n:
 *   h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,   y_t = sum_n h_t C_t.
 *
 * Training keeps the state at every `every`-th token (checkpoints[k] = h before token k * every,
 * layout [chunks, N, channels], channel-contiguous as the kernels hold it), 1/every of all states;
 * the backward recomputes the states of one chunk at a time from its checkpoint into a small buffer
 * ([every + 1, N, block] floats, and the decays [every, N, block]: stays in L2) and runs the reverse
 * scan over it, with the adjoint
 *   g_t = dL/dh_t = g_{t+1} exp(delta_{t+1} A) + dy_t C_t
 * giving, with a_t = exp(delta_t A):
 *   dC_t[n]    = sum_c dy_t[c] h_t[c, n]          dB_t[n]  = sum_c g_t[c, n] delta_t[c] u_t[c]
 *   du_t[c]    = delta_t[c] sum_n g_t B_t         dA[c, n] += g_t h_{t-1} a_t delta_t
 *   ddelta_t[c] = sum_n g_t (h_{t-1} a_t A + u_t B_t)
 * and dh0 = g_0 exp(delta_0 A) (the adjoint carried past the first token).
 *
 * Work is split by the caller over (batch element, channel slice [c0, c1)); within a slice the
 * channels are cut into blocks of `block` whose state h[N][block] lives in L1 and whose inner loops
 * run over contiguous channels (they vectorise). dB and dC are sums over channels: each call adds
 * into its own [T, N] buffers (the caller sums the slices' buffers), dA into its own rows of a
 * per-batch-element [channels, N] buffer. Nothing is shared between calls: no races.
 *
 * Both return 0, or 1 when the work buffers cannot be allocated.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_math.h"
#include "selective_scan_step.h"

enum { TRAIN_MAX_BLOCK = 1024 };

int linmix_selective_scan_forward_f32(const float *restrict u, const float *restrict delta, const float *restrict A,
                                      const float *restrict B, const float *restrict C, const float *restrict h0,
                                      float *restrict y, float *restrict h_final, float *restrict checkpoints,
                                      int64_t length, int64_t channels, int64_t state_size, int64_t every,
                                      int64_t c0, int64_t c1, int64_t block) {
    const int64_t N = state_size;
    if (c1 <= c0) return 0;
    if (block <= 0 || block > TRAIN_MAX_BLOCK) block = TRAIN_MAX_BLOCK;
    float *state = malloc(sizeof(float) * (size_t)(2 * N * block));
    if (!state) return 1;
    float *restrict h = state, *restrict a = state + N * block;
    float dt[TRAIN_MAX_BLOCK], du[TRAIN_MAX_BLOCK], acc[TRAIN_MAX_BLOCK];

    for (int64_t cb = c0; cb < c1; cb += block) {
        const int64_t nb = cb + block < c1 ? block : c1 - cb;
        for (int64_t n = 0; n < N; ++n)
            for (int64_t c = 0; c < nb; ++c) {
                a[n * block + c] = A[(cb + c) * N + n];
                h[n * block + c] = h0 ? h0[(cb + c) * N + n] : 0.0f;
            }
        for (int64_t t = 0; t < length; ++t) {
            if (checkpoints && t % every == 0) {
                float *restrict saved = checkpoints + (t / every) * N * channels + cb;
                for (int64_t n = 0; n < N; ++n) memcpy(saved + n * channels, h + n * block, sizeof(float) * (size_t)nb);
            }
            const float *restrict dp = delta + t * channels + cb, *restrict up = u + t * channels + cb;
            const float *restrict bp = B + t * N, *restrict cp = C + t * N;
            for (int64_t c = 0; c < nb; ++c) {
                dt[c] = dp[c];
                du[c] = dp[c] * up[c];
                acc[c] = 0.0f;
            }
            linmix_selective_scan_token(h, a, dt, du, bp, cp, acc, N, nb, block);
            float *restrict yp = y + t * channels + cb;
            for (int64_t c = 0; c < nb; ++c) yp[c] = acc[c];
        }
        if (h_final)
            for (int64_t n = 0; n < N; ++n)
                for (int64_t c = 0; c < nb; ++c) h_final[(cb + c) * N + n] = h[n * block + c];
    }
    free(state);
    return 0;
}

/* The sum of x[0..count) in float, in 16 lanes (a reduction the compiler vectorises without being
 * allowed to reassociate: the lanes are explicit). */
static inline float lane_sum(const float *restrict x, int64_t count) {
    float lanes[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= count; i += 16)
        for (int j = 0; j < 16; ++j) lanes[j] += x[i + j];
    float total = 0.0f;
    for (; i < count; ++i) total += x[i];
    for (int j = 0; j < 16; ++j) total += lanes[j];
    return total;
}

int linmix_selective_scan_backward_f32(const float *restrict u, const float *restrict delta, const float *restrict A,
                                       const float *restrict B, const float *restrict C,
                                       const float *restrict checkpoints, const float *restrict grad_y,
                                       const float *restrict grad_final, float *restrict grad_u,
                                       float *restrict grad_delta, float *restrict grad_A, float *restrict grad_B,
                                       float *restrict grad_C, float *restrict grad_h0, int64_t length,
                                       int64_t channels, int64_t state_size, int64_t every, int64_t c0, int64_t c1,
                                       int64_t block) {
    const int64_t N = state_size;
    if (c1 <= c0 || length <= 0) return 0;
    if (block <= 0 || block > TRAIN_MAX_BLOCK) block = TRAIN_MAX_BLOCK;
    /* a[N][block], g[N][block], dA[N][block], the chunk's states hs[every + 1][N][block] and decays
     * ds[every][N][block] (kept from the recomputation: reading them back from L2 is cheaper than a
     * second exp) */
    const size_t plane = (size_t)(N * block);
    float *work = malloc(sizeof(float) * plane * (size_t)(3 + every + 1 + every));
    if (!work) return 1;
    float *restrict a = work, *restrict g = work + plane, *restrict dA = work + 2 * plane, *restrict hs = work + 3 * plane;
    float *restrict ds = hs + (every + 1) * plane;
    float dt[TRAIN_MAX_BLOCK], du[TRAIN_MAX_BLOCK], up_c[TRAIN_MAX_BLOCK], dy[TRAIN_MAX_BLOCK];
    float sum_gB[TRAIN_MAX_BLOCK], sum_ghaA[TRAIN_MAX_BLOCK], prod[TRAIN_MAX_BLOCK], prod2[TRAIN_MAX_BLOCK];
    const int64_t chunks = (length + every - 1) / every;

    for (int64_t cb = c0; cb < c1; cb += block) {
        const int64_t nb = cb + block < c1 ? block : c1 - cb;
        for (int64_t n = 0; n < N; ++n)
            for (int64_t c = 0; c < nb; ++c) {
                a[n * block + c] = A[(cb + c) * N + n];
                g[n * block + c] = grad_final ? grad_final[(cb + c) * N + n] : 0.0f;
                dA[n * block + c] = 0.0f;
            }
        for (int64_t chunk = chunks - 1; chunk >= 0; --chunk) {
            const int64_t t0 = chunk * every, t1 = t0 + every < length ? t0 + every : length;
            /* hs[0] = the checkpoint, hs[i + 1] = h_{t0 + i} */
            const float *restrict saved = checkpoints + chunk * N * channels + cb;
            for (int64_t n = 0; n < N; ++n) memcpy(hs + n * block, saved + n * channels, sizeof(float) * (size_t)nb);
            for (int64_t t = t0; t < t1; ++t) {
                const float *restrict dp = delta + t * channels + cb, *restrict up = u + t * channels + cb;
                const float *restrict bp = B + t * N;
                const float *restrict prev = hs + (t - t0) * plane;
                float *restrict next = hs + (t - t0 + 1) * plane, *restrict decays = ds + (t - t0) * plane;
                for (int64_t n = 0; n < N; ++n) {
                    const float bn = bp[n];
                    for (int64_t c = 0; c < nb; ++c) {
                        const float decay = linmix_exp_nonpositive(dp[c] * a[n * block + c]);
                        decays[n * block + c] = decay;
                        next[n * block + c] = decay * prev[n * block + c] + dp[c] * up[c] * bn;
                    }
                }
            }
            for (int64_t t = t1 - 1; t >= t0; --t) {
                const float *restrict dp = delta + t * channels + cb, *restrict up = u + t * channels + cb;
                const float *restrict gy = grad_y + t * channels + cb;
                const float *restrict bp = B + t * N, *restrict cp = C + t * N;
                const float *restrict prev = hs + (t - t0) * plane, *restrict cur = hs + (t - t0 + 1) * plane;
                const float *restrict decays = ds + (t - t0) * plane;
                float *restrict dB = grad_B + t * N, *restrict dC = grad_C + t * N;
                for (int64_t c = 0; c < nb; ++c) {
                    dt[c] = dp[c];
                    up_c[c] = up[c];
                    du[c] = dp[c] * up[c];
                    dy[c] = gy[c];
                    sum_gB[c] = 0.0f;
                    sum_ghaA[c] = 0.0f;
                }
                for (int64_t n = 0; n < N; ++n) {
                    const float bn = bp[n], cn = cp[n];
                    float *restrict gn = g + n * block, *restrict dAn = dA + n * block;
                    const float *restrict an = a + n * block, *restrict pn = prev + n * block, *restrict hn = cur + n * block;
                    const float *restrict dn = decays + n * block;
                    for (int64_t c = 0; c < nb; ++c) {
                        const float decay = dn[c];
                        const float adjoint = gn[c] + dy[c] * cn;
                        const float through_decay = adjoint * pn[c] * decay;
                        dAn[c] += through_decay * dt[c];
                        sum_ghaA[c] += through_decay * an[c];
                        sum_gB[c] += adjoint * bn;
                        prod[c] = dy[c] * hn[c];
                        prod2[c] = adjoint * du[c];
                        gn[c] = adjoint * decay;
                    }
                    dC[n] += lane_sum(prod, nb);
                    dB[n] += lane_sum(prod2, nb);
                }
                float *restrict gu = grad_u + t * channels + cb, *restrict gd = grad_delta + t * channels + cb;
                for (int64_t c = 0; c < nb; ++c) {
                    gu[c] = dt[c] * sum_gB[c];
                    gd[c] = sum_ghaA[c] + up_c[c] * sum_gB[c];
                }
            }
        }
        for (int64_t n = 0; n < N; ++n)
            for (int64_t c = 0; c < nb; ++c) {
                grad_A[(cb + c) * N + n] = dA[n * block + c];
                if (grad_h0) grad_h0[(cb + c) * N + n] = g[n * block + c];
            }
    }
    free(work);
    return 0;
}
