// Small fused ops of a decoder layer, fp32, CPU: each replaces a chain of torch ops whose per-op dispatch costs
// more than their arithmetic at decode sizes (a [32, 128] RMSNorm is ~25 us as torch's composite, ~1 us here).
//
// rms_norm: out[t] = w * x[t] / sqrt(mean(x[t]^2) + eps), rows of D floats.
// qk_norm_rope: from one token-major qkv projection [T, (H + 2 Hkv) * Dh], the queries and keys, each head
// optionally RMS-normed over Dh (per-head weights), then rotated NeoX-style on their first R dims
// (x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] over the R dims); out q [T, H, Dh], k [T, Hkv, Dh].
#include <math.h>
#include <stddef.h>

static float inv_rms(const float *x, long D, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (long i = 0; i < D; i++) ss += x[i] * x[i];
    return 1.0f / sqrtf(ss / (float)D + eps);
}

void rms_norm(const float *x, const float *w, long T, long D, float eps, float *out) {
    for (long t = 0; t < T; t++) {
        const float *xt = x + t * D;
        float *ot = out + t * D;
        const float r = inv_rms(xt, D, eps);
#pragma omp simd
        for (long i = 0; i < D; i++) ot[i] = w[i] * (xt[i] * r);
    }
}

// One head: optional RMSNorm (w may be NULL), then the rotation of its first R dims; the rest copied.
static void norm_rotate(const float *x, const float *w, float eps, const float *cos, const float *sin, long Dh,
                        long R, float *out) {
    float tmp[1024];  // Dh <= 1024 (checked by the caller)
    if (w != NULL) {
        const float r = inv_rms(x, Dh, eps);
        for (long i = 0; i < Dh; i++) tmp[i] = w[i] * (x[i] * r);
    } else {
        for (long i = 0; i < Dh; i++) tmp[i] = x[i];
    }
    const long half = R / 2;
    for (long i = 0; i < half; i++) {
        out[i] = tmp[i] * cos[i] - tmp[i + half] * sin[i];
        out[i + half] = tmp[i + half] * cos[i + half] + tmp[i] * sin[i + half];
    }
    for (long i = R; i < Dh; i++) out[i] = tmp[i];
}

// cos/sin: [T, R] rows (the table rows of each token's position)
void qk_norm_rope(const float *qkv, long T, long H, long Hkv, long Dh, long R, const float *q_w, const float *k_w,
                  float eps, const float *cos, const float *sin, float *q_out, float *k_out) {
    const long row = (H + 2 * Hkv) * Dh;
    for (long t = 0; t < T; t++) {
        const float *src = qkv + t * row, *ct = cos + t * R, *st = sin + t * R;
        for (long h = 0; h < H; h++) norm_rotate(src + h * Dh, q_w, eps, ct, st, Dh, R, q_out + (t * H + h) * Dh);
        for (long h = 0; h < Hkv; h++)
            norm_rotate(src + (H + h) * Dh, k_w, eps, ct, st, Dh, R, k_out + (t * Hkv + h) * Dh);
    }
}
