// The routed experts of an MoE layer for a few rows in one call, fp32, CPU: softmax top-k router, then each
// chosen expert's rows together through its SwiGLU MLP (each weight row read once for all of them), weighted and
// summed into y. The serving engine's whole-model decode step includes this file (serve/models/csrc/decode_step.c);
// moe.kernels.moe_decode is its Python entry.
//
// moe_decode: x [T, D]; router_w [E, D]; w13 [E, 2F, D] (gate rows, then up), w2 [E, D, F]; out: y [T, D]
// (overwritten), ids / weights [T, K] (top-k, descending logits; ties: the lower expert), logits [T, E].
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

// Sum of each of eight vectors, as one vector: [sum(a0), ..., sum(a7)].
static inline __m256 hsum8x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                             __m256 a7) {
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

static inline float dot_avx(const float *restrict a, const float *restrict b, long n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    float acc = 0.0f;
    for (int j = 0; j < 8; j++) acc += lanes[j];
    for (; i < n; i++) acc += a[i] * b[i];
    return acc;
}

// y[o] = W[o, :] . x for one input row, I % 8 == 0: 8 weight rows per pass, 8 independent FMA chains (8 streams).
static void gemv_one(const float *W, long O, long I, const float *x, float *y, int nt) {
    const long O8 = O / 8 * 8;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && O * I >= (1L << 17))
    for (long o = 0; o < O8; o += 8) {
        const float *w = W + o * I;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (long c = 0; c < I; c += 8) {
            const __m256 xc = _mm256_loadu_ps(x + c);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c), xc, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + I + c), xc, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 2 * I + c), xc, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 3 * I + c), xc, a3);
            a4 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 4 * I + c), xc, a4);
            a5 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 5 * I + c), xc, a5);
            a6 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 6 * I + c), xc, a6);
            a7 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 7 * I + c), xc, a7);
        }
        _mm256_storeu_ps(y + o, hsum8x8(a0, a1, a2, a3, a4, a5, a6, a7));
    }
    for (long o = O8; o < O; o++) y[o] = dot_avx(W + o * I, x, I);
}

// Y[b, o] = W[o, :] . X[b, :] for B rows (X rows ldx apart, Y rows ldy apart). Tiles of 4 weight rows x 2 input
// rows in 8 accumulators (each loaded vector feeds two or four FMAs) when I % 8 == 0; threads over rows of W when
// there is enough work to share.
static void gemv(const float *W, long O, long I, const float *X, long B, long ldx, float *Y, long ldy, int nt) {
    if (B == 1 && I % 8 == 0) {
        gemv_one(W, O, I, X, Y, nt);
        return;
    }
    const long O4 = I % 8 == 0 ? O / 4 * 4 : 0;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && O * I * B >= (1L << 17))
    for (long o = 0; o < O4; o += 4) {
        const float *w0 = W + o * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
        long b = 0;
        for (; b + 2 <= B; b += 2) {
            const float *x0 = X + b * ldx, *x1 = x0 + ldx;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
                   a31 = a00;
            for (long c = 0; c < I; c += 8) {
                const __m256 xa = _mm256_loadu_ps(x0 + c), xb = _mm256_loadu_ps(x1 + c);
                __m256 v = _mm256_loadu_ps(w0 + c);
                a00 = _mm256_fmadd_ps(v, xa, a00), a01 = _mm256_fmadd_ps(v, xb, a01);
                v = _mm256_loadu_ps(w1 + c);
                a10 = _mm256_fmadd_ps(v, xa, a10), a11 = _mm256_fmadd_ps(v, xb, a11);
                v = _mm256_loadu_ps(w2 + c);
                a20 = _mm256_fmadd_ps(v, xa, a20), a21 = _mm256_fmadd_ps(v, xb, a21);
                v = _mm256_loadu_ps(w3 + c);
                a30 = _mm256_fmadd_ps(v, xa, a30), a31 = _mm256_fmadd_ps(v, xb, a31);
            }
            float sums[8];  // (row o + i, input b + j) at 2 i + j
            _mm256_storeu_ps(sums, hsum8x8(a00, a01, a10, a11, a20, a21, a30, a31));
            for (int i = 0; i < 4; i++) {
                Y[b * ldy + o + i] = sums[2 * i];
                Y[(b + 1) * ldy + o + i] = sums[2 * i + 1];
            }
        }
        for (; b < B; b++) {  // one input row: the 4 weight rows in one pass (4 streams; software prefetch into
            const float *x0 = X + b * ldx;  // L2 four rows ahead measured slower on the Mixtral-shaped decode)
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (long c = 0; c < I; c += 8) {
                const __m256 xa = _mm256_loadu_ps(x0 + c);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + c), xa, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + c), xa, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + c), xa, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + c), xa, a3);
            }
            float sums[8];
            _mm256_storeu_ps(sums, hsum8x8(a0, a1, a2, a3, a0, a1, a2, a3));
            for (int i = 0; i < 4; i++) Y[b * ldy + o + i] = sums[i];
        }
    }
    for (long o = O4; o < O; o++)
        for (long b = 0; b < B; b++) Y[b * ldy + o] = dot_avx(W + o * I, X + b * ldx, I);
}

// Y[r] = down(silu(gate) * up)(X[r]) for n rows (X rows D apart): w13 [2F, D] (gate rows, then up), w2 [D, F];
// H: scratch [n, 2F].
static void swiglu_rows(const float *w13, const float *w2, long F, long D, const float *X, long n, float *H,
                        float *Y, int nt) {
    gemv(w13, 2 * F, D, X, n, D, H, 2 * F, nt);
    for (long r = 0; r < n; r++) {
        float *hr = H + r * 2 * F;
        for (long f = 0; f < F; f++) hr[f] = hr[f] / (1.0f + expf(-hr[f])) * hr[F + f];
    }
    gemv(w2, D, F, H, n, 2 * F, Y, D, nt);
}

// The router of one row: top-k of the logits (ties: the lower expert), weights softmax(chosen logits) when
// renormalising (= the chosen probabilities over their sum), else the chosen entries of softmax(all logits).
static void route(const float *logits, long E, long K, int renormalize, int32_t *ids, float *weights) {
    for (long k = 0; k < K; k++) {
        long best = -1;
        for (long e = 0; e < E; e++) {
            int taken = 0;
            for (long j = 0; j < k; j++) taken |= ids[j] == e;
            if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
        }
        ids[k] = (int32_t)best;
    }
    float m = logits[ids[0]], sum = 0.0f;
    if (renormalize) {
        for (long k = 0; k < K; k++) sum += (weights[k] = expf(logits[ids[k]] - m));
    } else {
        for (long e = 0; e < E; e++) m = logits[e] > m ? logits[e] : m;
        for (long e = 0; e < E; e++) sum += expf(logits[e] - m);
        for (long k = 0; k < K; k++) weights[k] = expf(logits[ids[k]] - m);
    }
    for (long k = 0; k < K; k++) weights[k] /= sum;
}

// y[t] += sum_k weight_tk * expert_{id_tk}(x[t]) for T rows after routing them (router logits into lg, ids and
// weights [T, K]); scratch: floats T * (2 D + 2 F + 1), rows: T.
static void moe_rows(const float *x, long T, long D, const float *router_w, long E, long K, int renormalize,
                     const float *w13, const float *w2, long F, float *y, int32_t *ids, float *weights, float *lg,
                     float *scratch, int64_t *rows, int nt) {
    float *xs = scratch, *ys = xs + T * D, *hs = ys + T * D, *ws = hs + T * 2 * F;
    gemv(router_w, E, D, x, T, D, lg, E, nt);
    for (long t = 0; t < T; t++) route(lg + t * E, E, K, renormalize, ids + t * K, weights + t * K);
    for (long e = 0; e < E; e++) {
        long n = 0;
        for (long i = 0; i < T * K; i++) {
            if (ids[i] != e) continue;
            rows[n] = i / K, ws[n] = weights[i];
            for (long c = 0; c < D; c++) xs[n * D + c] = x[rows[n] * D + c];
            n++;
        }
        if (!n) continue;
        swiglu_rows(w13 + e * 2 * F * D, w2 + e * D * F, F, D, xs, n, hs, ys, nt);
        for (long r = 0; r < n; r++)
            for (long c = 0; c < D; c++) y[rows[r] * D + c] += ws[r] * ys[r * D + c];
    }
}

void moe_decode(const float *x, long T, long D, const float *router_w, long E, long K, int renormalize,
                const float *w13, const float *w2, long F, float *y, int32_t *ids, float *weights, float *logits,
                int nt) {
    float *scratch = malloc(sizeof(float) * T * (2 * D + 2 * F + 1));
    int64_t *rows = malloc(sizeof(int64_t) * T);
    for (long i = 0; i < T * D; i++) y[i] = 0.0f;
    moe_rows(x, T, D, router_w, E, K, renormalize, w13, w2, F, y, ids, weights, logits, scratch, rows, nt);
    free(rows);
    free(scratch);
}
