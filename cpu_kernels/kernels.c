/* Fused CPU kernels of the quantizers (quant/functional.py) and of a unit's BatchNorms with what
 * follows them (eval_unit.py, train_batch_norm.py): one pass over memory where PyTorch's
 * ops make several. float32, C-contiguous. Built at first use by quant/native.py with
 * -ffp-contract=off: every value is the same IEEE operation as in the PyTorch ops it replaces
 * (compare, divide, round half to even, multiply; a fused multiply-add only where PyTorch's
 * BatchNorm has one), so the forward results are the same bit for bit. The gradients' sums run in
 * another order than PyTorch's.
 *
 * A tensor quantized per channel is viewed as [outer, channels, inner]: dim 1 of an activation
 * (outer = batch, inner = height * width) or dim 0 of a weight (outer = 1). */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Below this many elements, starting threads costs more than it saves. */
#define PARALLEL_MIN 32768

/* v where keep is 1, +0 where it is 0: a select the compiler vectorizes (a branch it does not). */
static inline float keep_if(float v, int keep) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits &= -(uint32_t)keep;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* torch.clamp's order: max with lo first, then min with hi; NaN passes through. */
static inline float clamp(float v, float lo, float hi) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

/* The clip quantizer: round(clamp(v, 0, upper) / delta) * delta, in this order. */
static inline float clip_level(float v, float upper, float delta) {
    return rintf(clamp(v, 0.0f, upper) / delta) * delta;
}

/* LSQ: round(clamp(v / step, lo, hi)) * step. */
static inline float lsq_level(float v, float step, float lo, float hi) {
    return rintf(clamp(v / step, lo, hi)) * step;
}

/* PyTorch's ReLU: NaN passes through. */
static inline float relu(float v) { return v < 0.0f ? 0.0f : v; }

/* The clip quantizer's backward for one element: the gradient passed on to v (g where
 * 0 < v < clip); *term is v's share of the clip's gradient (g where v > clip). */
static inline float clip_grad(float g, float v, float clip, float *term) {
    *term = keep_if(g, v > clip);
    return g * (float)((v > 0.0f) & (v < clip));
}

/* LSQ's backward for one element, q = v / step: the gradient passed on to v (g where
 * lo <= q <= hi); *term is v's share of the step's gradient before its scale k: g * (round(q) - q)
 * inside the range, g * clamp(q) outside. */
static inline float lsq_grad(float g, float v, float step, float lo, float hi, float *term) {
    float q = v / step;
    int inside = (q >= lo) & (q <= hi);
    *term = g * (rintf(clamp(q, lo, hi)) - keep_if(q, inside));
    return g * (float)inside;
}

/* y = round(clamp(x, 0, upper) / delta) * delta */
void clip_forward(const float *x, float *y, int64_t n, float upper, float delta, int threads) {
#pragma omp parallel for num_threads(threads) if (n >= PARALLEL_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++)
        y[i] = clip_level(x[i], upper, delta);
}

/* Sums accumulate in double, in LANES running sums that the compiler keeps in vector registers, and
 * in CHUNKS fixed pieces combined in order: the same result for any number of threads. */
#define LANES 8
#define CHUNKS 64
#define ROW_LANES 16 /* one 512-bit vector of floats */
#define FLUSH_EVERY 4096 /* elements a float sum takes before it goes into the double */

static inline double sum_lanes(const double *acc) {
    double total = 0.0;
    for (int l = 0; l < LANES; l++)
        total += acc[l];
    return total;
}

/* One block of LANES elements of the clip backward: grad_x, and the running sums over x > clip. */
static inline void clip_backward_lanes(const float *x, const float *g, float *grad_x, float clip,
                                       int lanes, double *acc) {
    for (int l = 0; l < lanes; l++) {
        float term;
        grad_x[l] = clip_grad(g[l], x[l], clip, &term);
        acc[l] += term;
    }
}

/* grad_x = g where 0 < x < clip; returns the sum of g over x > clip. */
double clip_backward(const float *x, const float *g, float *grad_x, int64_t n, float clip,
                     int threads) {
    double chunk_sums[CHUNKS];
    int64_t step = (n + CHUNKS - 1) / CHUNKS;
#pragma omp parallel for num_threads(threads) if (n >= PARALLEL_MIN) schedule(static)
    for (int k = 0; k < CHUNKS; k++) {
        int64_t i = k * step, end = i + step < n ? i + step : n;
        double acc[LANES] = {0.0};
        for (; i + LANES <= end; i += LANES)
            clip_backward_lanes(x + i, g + i, grad_x + i, clip, LANES, acc);
        if (i < end)
            clip_backward_lanes(x + i, g + i, grad_x + i, clip, (int)(end - i), acc);
        chunk_sums[k] = sum_lanes(acc);
    }
    double grad_clip = 0.0;
    for (int k = 0; k < CHUNKS; k++)
        grad_clip += chunk_sums[k];
    return grad_clip;
}

/* y = round(clamp(x / s[c], lo, hi)) * s[c] */
void lsq_forward(const float *x, const float *s, float *y, int64_t outer, int64_t channels,
                 int64_t inner, float lo, float hi, int threads) {
    int64_t planes = outer * channels;
#pragma omp parallel for num_threads(threads) if (planes * inner >= PARALLEL_MIN) schedule(static)
    for (int64_t p = 0; p < planes; p++) {
        float a = s[p % channels];
        const float *xp = x + p * inner;
        float *yp = y + p * inner;
        for (int64_t i = 0; i < inner; i++)
            yp[i] = lsq_level(xp[i], a, lo, hi);
    }
}

/* One block of LANES elements of the LSQ backward. */
static inline void lsq_backward_lanes(const float *x, const float *g, float *grad_x, float a,
                                      float lo, float hi, int lanes, double *acc) {
    for (int l = 0; l < lanes; l++) {
        float term;
        grad_x[l] = lsq_grad(g[l], x[l], a, lo, hi, &term);
        acc[l] += term;
    }
}

/* With q = x / s[c]: grad_x = g where lo <= q <= hi; grad_s[c] = the sum of g * (round(q) - q)
 * inside the range and of g * clamp(q) outside. */
void lsq_backward(const float *x, const float *s, const float *g, float *grad_x, double *grad_s,
                  int64_t outer, int64_t channels, int64_t inner, float lo, float hi,
                  int threads) {
#pragma omp parallel for num_threads(threads) if (outer * channels * inner >= PARALLEL_MIN) \
    schedule(static)
    for (int64_t c = 0; c < channels; c++) {
        double acc[LANES] = {0.0};
        for (int64_t o = 0; o < outer; o++) {
            int64_t i = (o * channels + c) * inner, end = i + inner;
            for (; i + LANES <= end; i += LANES)
                lsq_backward_lanes(x + i, g + i, grad_x + i, s[c], lo, hi, LANES, acc);
            if (i < end)
                lsq_backward_lanes(x + i, g + i, grad_x + i, s[c], lo, hi, (int)(end - i), acc);
        }
        grad_s[c] = sum_lanes(acc);
    }
}

/* What follows a BatchNorm in the same pass: nothing, ReLU and a skip (BN_post of a unit in
 * training), or a quantizer (BN_pre of a unit): the clip quantizer or LSQ. */
enum { AFTER_NONE, AFTER_RELU_SKIP, AFTER_CLIP, AFTER_LSQ };

typedef struct {
    int kind;
    const float *skip;     /* AFTER_RELU_SKIP: channel c adds channel c % skip_channels */
    int64_t skip_channels;
    float upper, delta;    /* AFTER_CLIP: round(clamp(v, 0, upper) / delta) * delta */
    float clip;            /*   the clip value itself, for the backward */
    const float *step;     /* AFTER_LSQ: round(clamp(v / step[c], lo, hi)) * step[c] */
    float lo, hi;
} after_t;

/* yp = Q(x * a + b) over a row of channel c (one rounding: PyTorch's BatchNorm), Q the quantizer
 * of `after` (AFTER_CLIP, AFTER_LSQ; anything else: none). The kind is tested once a row, so that
 * each loop vectorizes on its own. */
static inline void bn_quantize_row(const after_t *after, const float *xp, float *yp, int64_t inner,
                                   float a, float b, int64_t c) {
    if (after->kind == AFTER_CLIP) {
        float upper = after->upper, delta = after->delta;
        for (int64_t i = 0; i < inner; i++)
            yp[i] = clip_level(fmaf(xp[i], a, b), upper, delta);
    } else if (after->kind == AFTER_LSQ) {
        float step = after->step[c], lo = after->lo, hi = after->hi;
        for (int64_t i = 0; i < inner; i++)
            yp[i] = lsq_level(fmaf(xp[i], a, b), step, lo, hi);
    } else {
        for (int64_t i = 0; i < inner; i++)
            yp[i] = fmaf(xp[i], a, b);
    }
}

/* ---- A unit in evaluation (eval_unit.py), around its convolution ----
 * PyTorch's CPU BatchNorm in evaluation computes y = x * alpha + beta with one rounding (a fused
 * multiply-add), where alpha = weight / sqrt(var + eps) and beta = bias - mean * alpha, also fused.
 * The caller computes alpha with PyTorch's ops and checks the whole unit against PyTorch's at
 * first use (eval_unit.py), as this depends on how PyTorch was built. */

static inline float bn_shift(float alpha, float mean, float bias) { return fmaf(-mean, alpha, bias); }

/* y = Q(BN_pre(x)), Q the quantizer of `after` (or none). */
void bn_quantize(const float *x, float *y, int64_t outer, int64_t channels, int64_t inner,
                 const float *alpha, const float *mean, const float *bias, const after_t *after,
                 int threads) {
    int64_t planes = outer * channels;
#pragma omp parallel for num_threads(threads) if (planes * inner >= PARALLEL_MIN) schedule(static)
    for (int64_t p = 0; p < planes; p++) {
        int64_t c = p % channels;
        float a = alpha[c], b = bn_shift(alpha[c], mean[c], bias[c]);
        bn_quantize_row(after, x + p * inner, y + p * inner, inner, a, b, c);
    }
}

/* out = BN_last(ReLU(BN_post(z)) + skip), z of shape [batch, channels, height, width]. Output
 * channel c adds channel c % skip_channels of `skip` (a repeated input); with `pooled`, its 2x2
 * average (ceil mode) over a skip of skip_height x skip_width: summed row by row, then divided by
 * the number of pixels, as PyTorch's avg_pool2d does. */
void bn_relu_skip_bn(const float *z, const float *skip, float *out, int64_t batch, int64_t channels,
                     int64_t height, int64_t width, int64_t skip_channels, int64_t skip_height,
                     int64_t skip_width, int pooled, const float *alpha_post,
                     const float *mean_post, const float *bias_post, const float *alpha_last,
                     const float *mean_last, const float *bias_last, int threads) {
    int64_t planes = batch * channels, inner = height * width;
#pragma omp parallel for num_threads(threads) if (planes * inner >= PARALLEL_MIN) schedule(static)
    for (int64_t p = 0; p < planes; p++) {
        int64_t n = p / channels, c = p % channels;
        float a2 = alpha_post[c], b2 = bn_shift(alpha_post[c], mean_post[c], bias_post[c]);
        float a3 = alpha_last[c], b3 = bn_shift(alpha_last[c], mean_last[c], bias_last[c]);
        const float *zp = z + p * inner;
        const float *sp = skip + (n * skip_channels + c % skip_channels) * skip_height * skip_width;
        float *op = out + p * inner;
        if (!pooled) {
            for (int64_t i = 0; i < inner; i++) {
                float v = fmaf(zp[i], a2, b2);
                op[i] = fmaf(relu(v) + sp[i], a3, b3);
            }
            continue;
        }
        for (int64_t oh = 0; oh < height; oh++) {
            int64_t h0 = 2 * oh, h1 = h0 + 2 < skip_height ? h0 + 2 : skip_height;
            for (int64_t ow = 0; ow < width; ow++) {
                int64_t w0 = 2 * ow, w1 = w0 + 2 < skip_width ? w0 + 2 : skip_width;
                float sum = 0.0f;
                for (int64_t ih = h0; ih < h1; ih++)
                    for (int64_t iw = w0; iw < w1; iw++)
                        sum += sp[ih * skip_width + iw];
                float pooled_skip = sum / (float)((h1 - h0) * (w1 - w0));
                float v = fmaf(zp[oh * width + ow], a2, b2);
                op[oh * width + ow] = fmaf(relu(v) + pooled_skip, a3, b3);
            }
        }
    }
}

/* ---- BatchNorm in training (train_batch_norm.py) ----
 * PyTorch's CPU kernel sums each channel in double, element after element, once for the mean and
 * once for the squared deviations: chains of dependent additions. The same sums, in the same order,
 * run here for LANES channels at once, so that the chains of different channels overlap. */

/* For channels c0 .. c0 + lanes - 1: sums[l] = the sum over the channel of (x - centre[l])^2 if
 * squared, else of x, in PyTorch's order (batch, then position). */
static inline void channel_sums(const float *x, int64_t batch, int64_t channels, int64_t inner,
                                int64_t c0, int lanes, const float *centre, int squared,
                                double *sums) {
    for (int l = 0; l < lanes; l++)
        sums[l] = 0.0;
    for (int64_t n = 0; n < batch; n++) {
        const float *xn = x + (n * channels + c0) * inner;
        for (int64_t i = 0; i < inner; i++)
            for (int l = 0; l < lanes; l++) {
                float v = xn[l * inner + i];
                if (squared) {
                    float d = v - centre[l];
                    sums[l] += d * d;
                } else {
                    sums[l] += v;
                }
            }
    }
}

/* y = BN(x) with each piece's statistics, then `after`: x holds `pieces` pieces of `batch` images,
 * each normalised over its own images (SPEC 5a), as one call on each piece would. save_mean and
 * save_invstd ([pieces][channels]) for the backward; the new running statistics from the first
 * piece's (momentum: the weight of this batch) in new_mean, new_var. */
void bn_train_forward(const float *x, float *y, int64_t pieces, int64_t batch, int64_t channels,
                      int64_t inner, const float *weight, const float *bias,
                      const float *running_mean, const float *running_var, float momentum,
                      double eps, float *save_mean, float *save_invstd, float *new_mean,
                      float *new_var, const after_t *after, int threads) {
    int64_t count = batch * inner, blocks = (channels + LANES - 1) / LANES;
#pragma omp parallel for num_threads(threads) \
    if (pieces * batch * channels * inner >= PARALLEL_MIN) schedule(dynamic)
    for (int64_t pb = 0; pb < pieces * blocks; pb++) {
        int64_t p = pb / blocks, c0 = (pb % blocks) * LANES, first = p * batch;
        const float *xs = x + first * channels * inner;
        int lanes = channels - c0 < LANES ? (int)(channels - c0) : LANES;
        double sums[LANES];
        float mean[LANES];
        if (lanes == LANES)
            channel_sums(xs, batch, channels, inner, c0, LANES, mean, 0, sums);
        else
            channel_sums(xs, batch, channels, inner, c0, lanes, mean, 0, sums);
        for (int l = 0; l < lanes; l++)
            mean[l] = (float)(sums[l] / (double)count);
        if (lanes == LANES)
            channel_sums(xs, batch, channels, inner, c0, LANES, mean, 1, sums);
        else
            channel_sums(xs, batch, channels, inner, c0, lanes, mean, 1, sums);
        for (int l = 0; l < lanes; l++) {
            int64_t c = c0 + l;
            float var_sum = (float)sums[l];
            float invstd = (float)(1.0 / sqrt((double)(var_sum / (float)count) + eps));
            save_mean[p * channels + c] = mean[l];
            save_invstd[p * channels + c] = invstd;
            if (p == 0) {
                new_mean[c] = momentum * mean[l] + (1.0f - momentum) * running_mean[c];
                new_var[c] = fmaf(momentum, var_sum / (float)(count - 1),
                                  (1.0f - momentum) * running_var[c]);
            }
            float a = invstd * weight[c], s = bn_shift(a, mean[l], bias[c]);
            for (int64_t n = first; n < first + batch; n++) {
                const float *xp = x + (n * channels + c) * inner;
                float *yp = y + (n * channels + c) * inner;
                if (after->kind == AFTER_RELU_SKIP) {
                    const float *sp = after->skip
                        + (n * after->skip_channels + c % after->skip_channels) * inner;
                    for (int64_t i = 0; i < inner; i++)
                        yp[i] = relu(fmaf(xp[i], a, s)) + sp[i];
                } else {
                    bn_quantize_row(after, xp, yp, inner, a, s, c);
                }
            }
        }
    }
}

/* The gradient reaching BN(x) = v from the gradient g of the output, through what followed it;
 * *term is what the quantizer's own parameter collects from this element (its sum over the
 * channel). Inlined with `kind` a constant, so that each kind compiles to a vectorized loop. */
static inline __attribute__((always_inline)) float grad_through(int kind, float g, float v,
                                                                float clip, float step, float lo,
                                                                float hi, float *term) {
    if (kind == AFTER_CLIP)
        return clip_grad(g, v, clip, term);
    if (kind == AFTER_LSQ)
        return lsq_grad(g, v, step, lo, hi, term);
    *term = 0.0f;  /* AFTER_RELU_SKIP: PyTorch's ReLU backward, nothing where the output is 0 */
    return keep_if(g, !(v <= 0.0f));
}

/* One channel of bn_train_backward. */
static inline __attribute__((always_inline)) void backward_channel(
    int kind, const float *x, const float *g, float *grad_x, int64_t batch, int64_t channels,
    int64_t inner, int64_t c, float weight, float bias, float mean, float invstd, float clip,
    float step, float lo, float hi, float *grad_weight, float *grad_bias, double *grad_after) {
    float a = invstd * weight, s = bn_shift(a, mean, bias);
    double sum_g = 0.0, dot = 0.0, sum_term = 0.0;
    float row_g[ROW_LANES] = {0.0f}, row_dot[ROW_LANES] = {0.0f}, row_term[ROW_LANES] = {0.0f};
    int64_t pending = 0;
    for (int64_t n = 0; n < batch; n++) {
        const float *xp = x + (n * channels + c) * inner, *gp = g + (n * channels + c) * inner;
        int64_t i = 0;
        for (; i + ROW_LANES <= inner; i += ROW_LANES)
            for (int l = 0; l < ROW_LANES; l++) {
                float term, gi = grad_through(kind, gp[i + l], fmaf(xp[i + l], a, s), clip, step,
                                              lo, hi, &term);
                row_g[l] += gi;
                row_dot[l] += gi * (xp[i + l] - mean);
                row_term[l] += term;
            }
        for (; i < inner; i++) {
            float term, gi = grad_through(kind, gp[i], fmaf(xp[i], a, s), clip, step, lo, hi, &term);
            row_g[0] += gi;
            row_dot[0] += gi * (xp[i] - mean);
            row_term[0] += term;
        }
        pending += inner;
        if (pending < FLUSH_EVERY && n + 1 < batch)
            continue;
        for (int l = 0; l < ROW_LANES; l++) {
            sum_g += row_g[l];
            dot += row_dot[l];
            sum_term += row_term[l];
            row_g[l] = row_dot[l] = row_term[l] = 0.0f;
        }
        pending = 0;
    }
    *grad_bias = (float)sum_g;
    *grad_weight = (float)(dot * invstd);
    *grad_after = sum_term;
    float k = (float)(dot * invstd * invstd / (double)(batch * inner));
    float grad_mean = (float)(sum_g / (double)(batch * inner)), scale = invstd * weight;
    for (int64_t n = 0; n < batch; n++) {
        const float *xp = x + (n * channels + c) * inner, *gp = g + (n * channels + c) * inner;
        float *dp = grad_x + (n * channels + c) * inner;
        for (int64_t i = 0; i < inner; i++) {
            float term, gi = grad_through(kind, gp[i], fmaf(xp[i], a, s), clip, step, lo, hi, &term);
            dp[i] = (gi - grad_mean - (xp[i] - mean) * k) * scale;
        }
    }
}

/* The gradients of bn_train_forward with respect to x, and per piece and channel
 * ([pieces][channels]) those of weight and bias and the sum that the quantizer's parameter collects
 * (grad_after: the clip's terms, or LSQ's step gradient before its scale k), for `after` a
 * quantizer or ReLU and skip (a plain BatchNorm's backward is PyTorch's own). The channel sums run
 * in ROW_LANES float sums along the channel's rows, added into double sums every FLUSH_EVERY
 * elements. */
void bn_train_backward(const float *x, const float *g, float *grad_x, int64_t pieces, int64_t batch,
                       int64_t channels, int64_t inner, const float *weight, const float *bias,
                       const float *save_mean, const float *save_invstd, const after_t *after,
                       float *grad_weight, float *grad_bias, double *grad_after, int threads) {
    int kind = after->kind;
    float clip = after->clip, lo = after->lo, hi = after->hi;
#pragma omp parallel for num_threads(threads) \
    if (pieces * batch * channels * inner >= PARALLEL_MIN) schedule(static)
    for (int64_t pc = 0; pc < pieces * channels; pc++) {
        int64_t c = pc % channels, offset = pc / channels * batch * channels * inner;
        float step = kind == AFTER_LSQ ? after->step[c] : 1.0f;
#define CHANNEL(KIND)                                                                              \
    backward_channel(KIND, x + offset, g + offset, grad_x + offset, batch, channels, inner, c,      \
                     weight[c], bias[c], save_mean[pc], save_invstd[pc], clip, step, lo, hi,        \
                     grad_weight + pc, grad_bias + pc, grad_after + pc)
        switch (kind) {
        case AFTER_CLIP: CHANNEL(AFTER_CLIP); break;
        case AFTER_LSQ: CHANNEL(AFTER_LSQ); break;
        default: CHANNEL(AFTER_RELU_SKIP);
        }
#undef CHANNEL
    }
}

/* Images as the model takes them: uint8 [n, c, hw] to float32 through a table of what each of the
 * 256 values of a channel becomes (computed by PyTorch's ToTensor and Normalize arithmetic, so the
 * values are theirs): one pass where four elementwise ops make four. In one thread: it runs beside
 * the loader workers, and a second OpenMP thread, spinning after each batch, would take a core from
 * them (15-20 % of their images/s on 2 cores) to save about a millisecond a batch. */
void normalize_images(const uint8_t *x, float *y, int64_t n, int64_t c, int64_t hw, const float *table) {
    int64_t planes = n * c;
    for (int64_t p = 0; p < planes; ++p) {
        const float *t = table + (p % c) * 256;
        const uint8_t *src = x + p * hw;
        float *dst = y + p * hw;
        for (int64_t i = 0; i < hw; ++i)
            dst[i] = t[src[i]];
    }
}
