/* Vision-RWKV's token shift and its mixes in one pass, for CPU inference (see __init__.py).
 *
 * For one batch element x [T, C] (T = height * width, row-major tokens, C contiguous) and n mix
 * vectors mu [n, C], writes for each i < n and token t
 *     out_i[t, c] = s[t, c] + mu_i[c] (x[t, c] - s[t, c])      (torch.lerp(s, x, mu_i))
 * where s = q_shift(x): with g = C / 4, channels [0, g) take the left neighbour, [g, 2g) the right
 * one, [2g, 3g) the one above, [3g, 4g) the one below (0 outside the grid), channels [4g, C) the
 * token itself. out_i starts at out + i * out_stride. Tokens [t0, t1) only (the caller splits T
 * across threads). Unlike q_shift followed by n lerps, x is read once and the shifted map is
 * never written.
 */
#include <stddef.h>
#include <stdint.h>

static void mix_range(const float *restrict x, const float *restrict neighbour, const float *restrict mu,
                      float *restrict out, int64_t lo, int64_t hi) {
    if (neighbour) {
        for (int64_t c = lo; c < hi; ++c) out[c] = neighbour[c] + mu[c] * (x[c] - neighbour[c]);
    } else {
        for (int64_t c = lo; c < hi; ++c) out[c] = mu[c] * x[c];
    }
}

void linmix_q_shift_lerp_f32(const float *restrict x, const float *restrict mu, float *restrict out, int64_t mixes,
                             int64_t height, int64_t width, int64_t channels, int64_t t0, int64_t t1,
                             int64_t out_stride) {
    const int64_t g = channels / 4;
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t h = t / width, w = t % width;
        const float *row = x + t * channels;
        const float *left = w > 0 ? row - channels : NULL;
        const float *right = w + 1 < width ? row + channels : NULL;
        const float *above = h > 0 ? row - width * channels : NULL;
        const float *below = h + 1 < height ? row + width * channels : NULL;
        for (int64_t i = 0; i < mixes; ++i) {
            const float *m = mu + i * channels;
            float *o = out + i * out_stride + t * channels;
            mix_range(row, left, m, o, 0, g);
            mix_range(row, right, m, o, g, 2 * g);
            mix_range(row, above, m, o, 2 * g, 3 * g);
            mix_range(row, below, m, o, 3 * g, 4 * g);
            for (int64_t c = 4 * g; c < channels; ++c) o[c] = row[c];
        }
    }
}
