/* Bi-WKV as linear scans over time, for CPU inference (see linmix/ops/native/__init__.py).
 *
 * Inputs for one batch element, layout [T, C] row-major (C contiguous), channels [c0, c1):
 *   k[t, c], v[t, c]; optionally gate[t, c] (receptance logits; NULL for none)
 *   decay[c]  = exp(-w[c]),  bonus[c] = exp(u[c])
 * With e_t = exp(k_t - max_t k_t) (in [0, 1]; 0 for masked keys, k = -inf), the output is
 *   y_t = (F_t + G_t + bonus e_t v_t) / (F'_t + G'_t + bonus e_t)   [times sigmoid(gate_t)]
 *   F_t = sum_{i<t} decay^(t-1-i) e_i v_i   (forward:  F_{t+1} = decay F_t + e_t v_t)
 *   G_t = sum_{i>t} decay^(i-t-1) e_i v_i   (backward: G_{t-1} = decay G_t + e_t v_t)
 * and F', G' the same sums with v = 1. That is exactly
 *   y_t = [sum_{i != t} exp(-(|t-i|-1) w + k_i) v_i + exp(u + k_t) v_t] / [same with v = 1]
 * with every exponent shifted by the channel's max key (which cancels in the ratio).
 *
 * Memory traffic is what costs here, so time is cut into blocks of `block` rows:
 *   pass 0 finds each channel's max key;
 *   pass 1 reads each block once and sums it both ways (its contribution to the forward sum at its
 *          end and to the backward sum at its start); a short sequential pass over the block
 *          totals gives every block's incoming forward and backward sums;
 *   pass 2 per block: a forward scan parks F, F' and e in block-sized buffers (cache resident),
 *          then a backward scan over the same rows (still in cache) writes y.
 * Every running sum is in double; e is computed in pass 1 and again in pass 2 (cheaper than a
 * sequence-long buffer). Inner loops run over contiguous channels so that the compiler vectorises them; the caller
 * splits channels across threads.
 *
 * Returns 0, or 1 when the work buffers cannot be allocated.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "fast_math.h"

/* Replaces each block's (num, den) totals at offset `part` (0 forward, 2 backward) of its five rows
 * by the sums flowing into it from the blocks before it (after it when `reverse`):
 * carry' = carry * decay^rows + block total. */
static void incoming_sums(double *totals, int64_t n, int64_t blocks, int64_t part, int reverse,
                          double *restrict carry_num, double *restrict carry_den) {
    for (int64_t c = 0; c < n; ++c) carry_num[c] = carry_den[c] = 0.0;
    for (int64_t i = 0; i < blocks; ++i) {
        const int64_t j = reverse ? blocks - 1 - i : i;
        double *restrict sum_num = totals + (5 * j + part) * n, *restrict sum_den = sum_num + n;
        const double *restrict power = totals + (5 * j + 4) * n;
        for (int64_t c = 0; c < n; ++c) {
            const double block_num = sum_num[c], block_den = sum_den[c];
            sum_num[c] = carry_num[c];
            sum_den[c] = carry_den[c];
            carry_num[c] = carry_num[c] * power[c] + block_num;
            carry_den[c] = carry_den[c] * power[c] + block_den;
        }
    }
}

int linmix_bi_wkv_f32(const float *restrict k, const float *restrict v, const float *restrict gate,
                      const double *restrict decay, const double *restrict bonus, float *restrict y, int64_t length,
                      int64_t channels, int64_t c0, int64_t c1, int64_t block) {
    const int64_t n = c1 - c0;
    if (n <= 0 || length <= 0) return 0;
    if (block <= 0 || block > length) block = length;
    const int64_t blocks = (length + block - 1) / block;
    /* Per block and channel: forward total (num, den), backward total (num, den), decay^rows. */
    double *totals = malloc(sizeof(double) * 5 * (size_t)(blocks * n));
    double *parked = malloc(sizeof(double) * 2 * (size_t)(block * n)); /* F, F' of one block */
    double *num = malloc(sizeof(double) * 4 * (size_t)n);
    float *shift = malloc(sizeof(float) * (2 + (size_t)block) * (size_t)n);
    if (!totals || !parked || !num || !shift) {
        free(totals);
        free(parked);
        free(num);
        free(shift);
        return 1;
    }
    float *restrict ex = shift + n; /* one row of e, in its own loop so that both loops vectorise */
    float *restrict parked_e = shift + 2 * n; /* e of one block, from the forward scan to the backward one */
    double *den = num + n, *carry_num = num + 2 * n, *carry_den = num + 3 * n;
    const double *restrict dc = decay + c0, *restrict bc = bonus + c0;

    /* pass 0: each channel's max key; 0 for a channel with every key masked (its e are then all 0). */
    for (int64_t c = 0; c < n; ++c) shift[c] = -INFINITY;
    for (int64_t t = 0; t < length; ++t) {
        const float *restrict kt = k + t * channels + c0;
        for (int64_t c = 0; c < n; ++c) shift[c] = kt[c] > shift[c] ? kt[c] : shift[c];
    }
    for (int64_t c = 0; c < n; ++c) shift[c] = shift[c] > -FLT_MAX ? shift[c] : 0.0f;

    /* pass 1: block totals. */
    for (int64_t j = 0; j < blocks; ++j) {
        const int64_t start = j * block, stop = start + block < length ? start + block : length;
        double *restrict fwd_num = totals + (5 * j) * n, *restrict fwd_den = fwd_num + n;
        double *restrict bwd_num = fwd_den + n, *restrict bwd_den = bwd_num + n, *restrict power = bwd_den + n;
        for (int64_t c = 0; c < n; ++c) fwd_num[c] = fwd_den[c] = bwd_num[c] = bwd_den[c] = 0.0, power[c] = 1.0;
        for (int64_t t = start; t < stop; ++t) {
            const float *restrict kt = k + t * channels + c0, *restrict vt = v + t * channels + c0;
            for (int64_t c = 0; c < n; ++c) ex[c] = linmix_exp_nonpositive(kt[c] - shift[c]);
            for (int64_t c = 0; c < n; ++c) {
                const double x = ex[c], xv = x * vt[c], p = power[c];
                fwd_num[c] = fwd_num[c] * dc[c] + xv; /* sum decay^(stop-1-i) x_i */
                fwd_den[c] = fwd_den[c] * dc[c] + x;
                bwd_num[c] += p * xv; /* sum decay^(i-start) x_i */
                bwd_den[c] += p * x;
                power[c] = p * dc[c];
            }
        }
    }
    /* Incoming sums: forward into block j (F at its first row), in place of its forward totals;
     * backward into block j (G at its last row), in place of its backward totals. */
    incoming_sums(totals, n, blocks, 0, 0, carry_num, carry_den);
    incoming_sums(totals, n, blocks, 2, 1, carry_num, carry_den);

    /* pass 2: per block, forward scan into `parked`, then backward scan writing y. */
    for (int64_t j = 0; j < blocks; ++j) {
        const int64_t start = j * block, stop = start + block < length ? start + block : length;
        const double *in = totals + (5 * j) * n;
        for (int64_t c = 0; c < n; ++c) num[c] = in[c], den[c] = in[n + c];
        for (int64_t t = start; t < stop; ++t) {
            const float *restrict kt = k + t * channels + c0, *restrict vt = v + t * channels + c0;
            double *restrict pn = parked + 2 * (t - start) * n, *restrict pd = pn + n;
            float *restrict et = parked_e + (t - start) * n;
            for (int64_t c = 0; c < n; ++c) et[c] = linmix_exp_nonpositive(kt[c] - shift[c]);
            for (int64_t c = 0; c < n; ++c) {
                const double x = et[c];
                pn[c] = num[c];
                pd[c] = den[c];
                num[c] = num[c] * dc[c] + x * vt[c];
                den[c] = den[c] * dc[c] + x;
            }
        }
        for (int64_t c = 0; c < n; ++c) num[c] = in[2 * n + c], den[c] = in[3 * n + c];
        for (int64_t t = stop - 1; t >= start; --t) {
            const float *restrict vt = v + t * channels + c0, *restrict et = parked_e + (t - start) * n;
            const double *restrict pn = parked + 2 * (t - start) * n, *restrict pd = pn + n;
            float *restrict yt = y + t * channels + c0;
            for (int64_t c = 0; c < n; ++c) {
                const double x = et[c], xv = x * vt[c];
                const double total_num = pn[c] + num[c] + bc[c] * xv;
                const double total_den = pd[c] + den[c] + bc[c] * x;
                /* total_den is 0 only where every key of the channel is masked, and then so is
                 * total_num: the output is 0. (No branch, so the loop vectorises.) */
                yt[c] = (float)(total_num / (total_den > DBL_MIN ? total_den : DBL_MIN));
                num[c] = num[c] * dc[c] + xv;
                den[c] = den[c] * dc[c] + x;
            }
            if (gate) {
                const float *restrict gt = gate + t * channels + c0;
                for (int64_t c = 0; c < n; ++c) yt[c] *= linmix_sigmoid(gt[c]);
            }
        }
    }
    free(totals);
    free(parked);
    free(num);
    free(shift);
    return 0;
}
