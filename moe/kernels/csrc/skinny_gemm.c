/* Skinny GEMM for CPU decode: Y[m, o] = sum_d W[o, d] * X[m, d] for few token rows m (M <= ~16).
 *
 * W is an expert weight in [out, in] layout, far larger than the caches; X holds the M token rows routed
 * to that expert. BLAS sgemm repacks W on every call and runs this shape far below the FMA peak; here each
 * block of 4 weight rows is streamed from memory once, stays in L1, and is multiplied against the token
 * rows in register tiles of 4 weight rows x NX token rows (AVX2: NX <= 3, 12 accumulators + 3 loads + 1
 * weight vector in the 16 ymm registers; AVX-512 where the CPU has it: NX <= 6, 24 + 6 + 1 of the 32 zmm).
 * Weight-row blocks are split over OpenMP threads. The ISA changes the summation order (8 or 16 lanes), so
 * results are bit-identical between calls on one machine, not across machines.
 */
#include <immintrin.h>

#define OB 4
#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* y[j * ldy + i] = dot(w[i], x[j]) for i < OB, j < NX (NX a compile-time constant after inlining); meanwhile
 * the lines [pf_lo, pf_hi) of the OB weight rows at `prefetch` are pulled into L2. */
ALWAYS_INLINE void tile(const float *w, long ldw, const float *x, long ldx, const int NX, long D,
                        float *y, long ldy, const float *prefetch, long pf_lo, long pf_hi) {
    __m256 acc[OB][3];
    for (int i = 0; i < OB; i++)
        for (int j = 0; j < NX; j++) acc[i][j] = _mm256_setzero_ps();
    long d = 0;
    for (; d + 8 <= D; d += 8) {
        __m256 xv[3];
        for (int j = 0; j < NX; j++) xv[j] = _mm256_loadu_ps(x + j * ldx + d);
        if (prefetch && (d & 15) == 0 && d >= pf_lo && d < pf_hi)  /* one 64-byte line per row, every 2 steps */
            for (int i = 0; i < OB; i++) _mm_prefetch((const char *)(prefetch + i * ldw + d), _MM_HINT_T1);
        for (int i = 0; i < OB; i++) {
            __m256 wv = _mm256_loadu_ps(w + i * ldw + d);
            for (int j = 0; j < NX; j++) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < OB; i++) {
        for (int j = 0; j < NX; j++) {
            float s = hsum(acc[i][j]);
            for (long t = d; t < D; t++) s += w[i * ldw + t] * x[j * ldx + t];
            y[j * ldy + i] = s;
        }
    }
}

static void rows_scalar(const float *w, long ldw, int nw, const float *x, long ldx, long M, long D,
                        float *y, long ldy) {
    for (int i = 0; i < nw; i++)
        for (long j = 0; j < M; j++) {
            float s = 0.0f;
            for (long t = 0; t < D; t++) s += w[i * ldw + t] * x[j * ldx + t];
            y[j * ldy + i] = s;
        }
}

/* ---- AVX-512 (where the CPU has it): tiles of OB weight rows x up to 6 token rows in 24 zmm accumulators.
 * On Zen 4 (2 threads): 1.2-1.3x the AVX2 tiles on weights in cache, 1.1-1.25x streaming at 3-6 rows, the
 * same at 1-2 rows (bandwidth-bound either way). ---- */
#define AVX512 __attribute__((target("avx512f")))

static int has_avx512;
__attribute__((constructor)) static void detect_isa(void) {
    __builtin_cpu_init();
    has_avx512 = __builtin_cpu_supports("avx512f");
}

/* Tests: 0 forces the AVX2 tiles for every later call, 1 goes back to AVX-512 where the CPU has it. Returns
 * whether AVX-512 tiles run now. Not for concurrent use with running kernels. */
int skinny_gemm_use_avx512(int on) {
    has_avx512 = on && __builtin_cpu_supports("avx512f");
    return has_avx512;
}

/* tile() with 16-lane vectors; NX <= 6. */
AVX512 ALWAYS_INLINE void tile512(const float *w, long ldw, const float *x, long ldx, const int NX, long D, float *y,
                                  long ldy, const float *prefetch, long pf_lo, long pf_hi) {
    __m512 acc[OB][6];
    for (int i = 0; i < OB; i++)
        for (int j = 0; j < NX; j++) acc[i][j] = _mm512_setzero_ps();
    long d = 0;
    for (; d + 16 <= D; d += 16) {
        __m512 xv[6];
        for (int j = 0; j < NX; j++) xv[j] = _mm512_loadu_ps(x + j * ldx + d);
        if (prefetch && d >= pf_lo && d < pf_hi)  /* one 64-byte line per weight row and step */
            for (int i = 0; i < OB; i++) _mm_prefetch((const char *)(prefetch + i * ldw + d), _MM_HINT_T1);
        for (int i = 0; i < OB; i++) {
            const __m512 wv = _mm512_loadu_ps(w + i * ldw + d);
            for (int j = 0; j < NX; j++) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < OB; i++)
        for (int j = 0; j < NX; j++) {
            float s = _mm512_reduce_add_ps(acc[i][j]);
            for (long t = d; t < D; t++) s += w[i * ldw + t] * x[j * ldx + t];
            y[j * ldy + i] = s;
        }
}

AVX512 static void weight_block512(const float *w, long ldw, const float *x, long ldx, long M, long D, float *y,
                                   long ldy, const float *next) {
    const long tiles = (M + 5) / 6, share = (D / tiles + 15) & ~15L;
    long m = 0, t = 0;
    for (; m + 6 <= M; m += 6, t++)
        tile512(w, ldw, x + m * ldx, ldx, 6, D, y + m * ldy, ldy, next, t * share,
                t == tiles - 1 ? D : (t + 1) * share);
    const long lo = t * share;
    switch (M - m) {
        case 5: tile512(w, ldw, x + m * ldx, ldx, 5, D, y + m * ldy, ldy, next, lo, D); break;
        case 4: tile512(w, ldw, x + m * ldx, ldx, 4, D, y + m * ldy, ldy, next, lo, D); break;
        case 3: tile512(w, ldw, x + m * ldx, ldx, 3, D, y + m * ldy, ldy, next, lo, D); break;
        case 2: tile512(w, ldw, x + m * ldx, ldx, 2, D, y + m * ldy, ldy, next, lo, D); break;
        case 1: tile512(w, ldw, x + m * ldx, ldx, 1, D, y + m * ldy, ldy, next, lo, D); break;
    }
}

/* Rows o .. o+OB (fewer at the end: nw) of W against all M token rows: y[m][i] for the block starting at w. */
static void weight_block(const float *w, long ldw, long nw, const float *x, long ldx, long M, long D, float *y,
                         long ldy) {
    if (nw < OB) {
        rows_scalar(w, ldw, (int)nw, x, ldx, M, D, y, ldy);
        return;
    }
    /* While the token tiles compute on this block, pull the next block into L2, each tile an equal share of its
     * lines (into L2, not L1: the block, the token rows and the next block together overflow L1; with all of
     * it issued by the first tile into L1 the kernel streamed 20-35% slower). */
    const float *next = nw >= 2 * OB ? w + OB * ldw : 0;
    if (has_avx512) {
        weight_block512(w, ldw, x, ldx, M, D, y, ldy, next);
        return;
    }
    const long tiles = (M + 2) / 3, share = (D / tiles + 15) & ~15L;
    long m = 0, t = 0;
    for (; m + 3 <= M; m += 3, t++)
        tile(w, ldw, x + m * ldx, ldx, 3, D, y + m * ldy, ldy, next, t * share, t == tiles - 1 ? D : (t + 1) * share);
    if (M - m == 2) tile(w, ldw, x + m * ldx, ldx, 2, D, y + m * ldy, ldy, next, t * share, D);
    if (M - m == 1) tile(w, ldw, x + m * ldx, ldx, 1, D, y + m * ldy, ldy, next, t * share, D);
}

/* Y [M, O] (row stride ldy) = X [M, D] (row stride ldx) . W [O, D]^T (row stride ldw). */
void skinny_gemm_nt(const float *W, long O, long D, long ldw, const float *X, long M, long ldx,
                    float *Y, long ldy, int num_threads) {
    long blocks = (O + OB - 1) / OB;
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads)
    for (long b = 0; b < blocks; b++) {
        long o = b * OB;
        weight_block(W + o * ldw, ldw, O - o, X, ldx, M, D, Y + o, ldy);
    }
}


/* Every expert at once: Y[r] = X[r] . W[e]^T for the rows r of expert e, rows sorted by expert, counts[e] rows
 * each (all of them few). One parallel region over (expert, weight-row block) pairs instead of one call per
 * expert: with small experts the per-call cost (Python, thread wake-up) is what a decode step pays. */
void skinny_gemm_grouped_nt(const float *W, long L, long O, long D, long ldw, long lde, const float *X,
                            const long *counts, long ldx, float *Y, long ldy, int num_threads) {
    long starts[L > 0 ? L : 1];
    long rows = 0;
    for (long e = 0; e < L; e++) { starts[e] = rows; rows += counts[e]; }
    long blocks = (O + OB - 1) / OB;
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads)
    for (long eb = 0; eb < L * blocks; eb++) {
        long e = eb / blocks, o = (eb % blocks) * OB;
        if (counts[e] > 0)
            weight_block(W + e * lde + o * ldw, ldw, O - o, X + starts[e] * ldx, ldx, counts[e], D,
                         Y + starts[e] * ldy + o, ldy);
    }
}

/* ---- A decode-sized MoE layer in two calls (few rows per expert), around the activation done by the caller. ----
 * Part 1: stable counting sort of the N = T*K routed rows by expert (order[i] = routed pair of sorted row i,
 * pair n = t*K + k), the token rows gathered into xs, H = xs . W13[e]^T per expert block. Returns 0; -1 when an
 * expert would get more than max_rows rows (the caller's GEMMs are then faster); -2 for an id outside [0, E).
 * counts and order are written in every case, nothing else on failure. */
int moe_decode_up(const float *X, long T, long D, long ldx, const int32_t *ids, long K, const float *W13, long E,
                  long O, long ldw, long lde, long max_rows, long *order, long *counts, float *xs, float *H,
                  int num_threads) {
    const long N = T * K;
    long next[E > 0 ? E : 1];
    for (long e = 0; e < E; e++) counts[e] = 0;
    for (long n = 0; n < N; n++) {
        if (ids[n] < 0 || ids[n] >= E) return -2;
        counts[ids[n]]++;
    }
    long start = 0, most = 0;
    for (long e = 0; e < E; e++) {
        next[e] = start;
        start += counts[e];
        most = counts[e] > most ? counts[e] : most;
    }
    for (long n = 0; n < N; n++) order[next[ids[n]]++] = n;
    if (most > max_rows) return -1;
    for (long i = 0; i < N; i++) {
        const float *src = X + (order[i] / K) * ldx;
        for (long d = 0; d < D; d++) xs[i * D + d] = src[d];
    }
    skinny_gemm_grouped_nt(W13, E, O, D, ldw, lde, xs, counts, D, H, O, num_threads);
    return 0;
}

/* Part 2: ys = A . W2[e]^T per expert block (A [N, F] sorted rows, after the activation), then
 * Y[t] = sum over k in order of weights[t, k] * ys[row of pair t*K+k], each product rounded before the add:
 * the order and rounding of moe.reference / all_to_all.dispatcher.weighted_sum. pos: N longs of scratch. */
void moe_decode_down(const float *A, long F, const float *W2, long D, long ldw, long lde, const long *counts,
                     long E, const long *order, const float *weights, long T, long K, long *pos, float *ys,
                     float *Y, int num_threads) {
    const long N = T * K;
    skinny_gemm_grouped_nt(W2, E, D, F, ldw, lde, A, counts, F, ys, D, num_threads);
    for (long i = 0; i < N; i++) pos[order[i]] = i;
    for (long t = 0; t < T; t++) {
        float *y = Y + t * D;
        for (long k = 0; k < K; k++) {
            const __m256 w = _mm256_set1_ps(weights[t * K + k]);
            const float *r = ys + pos[t * K + k] * D;
            long d = 0;
            for (; d + 8 <= D; d += 8) {
                const __m256 p = _mm256_mul_ps(w, _mm256_loadu_ps(r + d));
                _mm256_storeu_ps(y + d, k ? _mm256_add_ps(_mm256_loadu_ps(y + d), p) : p);
            }
            for (; d < D; d++) {  /* built with -ffp-contract=off: the product is rounded, as in torch */
                const float p = weights[t * K + k] * r[d];
                y[d] = k ? y[d] + p : p;
            }
        }
    }
}

/* ---- FP8 (e4m3fn) weights: the same tiling, converting each weight vector in registers (fp8_e4m3.h). ---- */
#include "fp8_e4m3.h"

/* As tile(), with e4m3 weights; the lines [pf_lo, pf_hi) of the next block's rows go to L2 meanwhile. */
ALWAYS_INLINE void tile_fp8(const uint8_t *w, long ldw, long o, const float *scale, long scale_ld, int block,
                            const float *x, long ldx, const int NX, long D, float *y, long ldy,
                            const uint8_t *prefetch, long pf_lo, long pf_hi) {
    const float pow2_120 = FP8_POW2_120;
    __m256 acc[OB][3];
    __m256 sc[OB];
    for (int i = 0; i < OB; i++) {
        sc[i] = _mm256_set1_ps(row_scale(scale, scale_ld, block, o + i, 0) * pow2_120);
        for (int j = 0; j < NX; j++) acc[i][j] = _mm256_setzero_ps();
    }
    long d = 0;
    for (; d + 8 <= D; d += 8) {
        if (block && d % block == 0 && d)
            for (int i = 0; i < OB; i++) sc[i] = _mm256_set1_ps(row_scale(scale, scale_ld, block, o + i, d) * pow2_120);
        __m256 xv[3];
        for (int j = 0; j < NX; j++) xv[j] = _mm256_loadu_ps(x + j * ldx + d);
        if (prefetch && (d & 63) == 0 && d >= pf_lo && d < pf_hi)  /* one 64-byte line per row every 8 steps */
            for (int i = 0; i < OB; i++) _mm_prefetch((const char *)(prefetch + i * ldw + d), _MM_HINT_T1);
        for (int i = 0; i < OB; i++) {
            __m256 wv = fp8x8_to_f32(w + i * ldw + d, sc[i]);
            for (int j = 0; j < NX; j++) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < OB; i++) {
        for (int j = 0; j < NX; j++) {
            float s = hsum(acc[i][j]);
            for (long t = d; t < D; t++)
                s += fp8_to_f32(w[i * ldw + t]) * row_scale(scale, scale_ld, block, o + i, t) * x[j * ldx + t];
            y[j * ldy + i] = s;
        }
    }
}

/* tile_fp8() with 16-lane vectors where the CPU has AVX-512; NX <= 6. `block` must be 0 or a multiple of 16. */
AVX512 ALWAYS_INLINE __m512 fp8x16_to_f32(const uint8_t *p, __m512 scale) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    const __m512i bits = _mm512_and_si512(_mm512_srai_epi32(_mm512_slli_epi32(b, 24), 4),
                                          _mm512_set1_epi32((int)0x87F00000));
    return _mm512_mul_ps(_mm512_castsi512_ps(bits), scale);
}

AVX512 ALWAYS_INLINE void tile_fp8_512(const uint8_t *w, long ldw, long o, const float *scale, long scale_ld,
                                       int block, const float *x, long ldx, const int NX, long D, float *y, long ldy,
                                       const uint8_t *prefetch, long pf_lo, long pf_hi) {
    __m512 acc[OB][6], sc[OB];
    for (int i = 0; i < OB; i++) {
        sc[i] = _mm512_set1_ps(row_scale(scale, scale_ld, block, o + i, 0) * FP8_POW2_120);
        for (int j = 0; j < NX; j++) acc[i][j] = _mm512_setzero_ps();
    }
    long d = 0, next_scale = block ? block : D;  /* the d where the block scales change next */
    for (; d + 16 <= D; d += 16) {
        if (d == next_scale) {
            for (int i = 0; i < OB; i++)
                sc[i] = _mm512_set1_ps(row_scale(scale, scale_ld, block, o + i, d) * FP8_POW2_120);
            next_scale += block;
        }
        __m512 xv[6];
        for (int j = 0; j < NX; j++) xv[j] = _mm512_loadu_ps(x + j * ldx + d);
        if (prefetch && (d & 63) == 0 && d >= pf_lo && d < pf_hi)  /* one 64-byte line per row every 4 steps */
            for (int i = 0; i < OB; i++) _mm_prefetch((const char *)(prefetch + i * ldw + d), _MM_HINT_T1);
        for (int i = 0; i < OB; i++) {
            const __m512 wv = fp8x16_to_f32(w + i * ldw + d, sc[i]);
            for (int j = 0; j < NX; j++) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < OB; i++)
        for (int j = 0; j < NX; j++) {
            float s = _mm512_reduce_add_ps(acc[i][j]);
            for (long t = d; t < D; t++)
                s += fp8_to_f32(w[i * ldw + t]) * row_scale(scale, scale_ld, block, o + i, t) * x[j * ldx + t];
            y[j * ldy + i] = s;
        }
}

/* One block of OB e4m3 weight rows against all M token rows with the AVX-512 tiles (as weight_block512). */
AVX512 static void weight_block_fp8_512(const uint8_t *w, long ldw, long o, const float *scale, long scale_ld,
                                        int block, const float *x, long ldx, long M, long D, float *y, long ldy,
                                        const uint8_t *next) {
    const long tiles = (M + 5) / 6, share = (D / tiles + 63) & ~63L;
    long m = 0, t = 0;
    for (; m + 6 <= M; m += 6, t++)
        tile_fp8_512(w, ldw, o, scale, scale_ld, block, x + m * ldx, ldx, 6, D, y + m * ldy, ldy, next, t * share,
                     t == tiles - 1 ? D : (t + 1) * share);
    const long lo = t * share;
    const float *xm = x + m * ldx;
    float *ym = y + m * ldy;
    switch (M - m) {
        case 5: tile_fp8_512(w, ldw, o, scale, scale_ld, block, xm, ldx, 5, D, ym, ldy, next, lo, D); break;
        case 4: tile_fp8_512(w, ldw, o, scale, scale_ld, block, xm, ldx, 4, D, ym, ldy, next, lo, D); break;
        case 3: tile_fp8_512(w, ldw, o, scale, scale_ld, block, xm, ldx, 3, D, ym, ldy, next, lo, D); break;
        case 2: tile_fp8_512(w, ldw, o, scale, scale_ld, block, xm, ldx, 2, D, ym, ldy, next, lo, D); break;
        case 1: tile_fp8_512(w, ldw, o, scale, scale_ld, block, xm, ldx, 1, D, ym, ldy, next, lo, D); break;
    }
}

static void rows_scalar_fp8(const uint8_t *w, long ldw, long o, int nw, const float *scale, long scale_ld, int block,
                            const float *x, long ldx, long M, long D, float *y, long ldy) {
    for (int i = 0; i < nw; i++)
        for (long j = 0; j < M; j++) {
            float s = 0.0f;
            for (long t = 0; t < D; t++)
                s += fp8_to_f32(w[i * ldw + t]) * row_scale(scale, scale_ld, block, o + i, t) * x[j * ldx + t];
            y[j * ldy + i] = s;
        }
}

/* Rows o .. o+OB (fewer at the end) of e4m3 W [O, D] against all M token rows (as weight_block). */
static void weight_block_fp8(const uint8_t *W, long O, long D, long ldw, long o, const float *scale, long scale_ld,
                             int block, const float *X, long M, long ldx, float *Y, long ldy) {
    const uint8_t *w = W + o * ldw;
    /* a tile must not straddle two scale rows */
    if (O - o < OB || (block && (o / block) != ((o + OB - 1) / block))) {
        int nw = (int)(O - o < OB ? O - o : OB);
        rows_scalar_fp8(w, ldw, o, nw, scale, scale_ld, block, X, ldx, M, D, Y + o, ldy);
        return;
    }
    /* the next block into L2 while this one computes, in equal shares over the token tiles (as weight_block) */
    const uint8_t *next = O - o >= 2 * OB ? w + OB * ldw : 0;
    if (has_avx512 && block % 16 == 0) {
        weight_block_fp8_512(w, ldw, o, scale, scale_ld, block, X, ldx, M, D, Y + o, ldy, next);
        return;
    }
    const long tiles = (M + 2) / 3, share = (D / tiles + 63) & ~63L;
    long m = 0, t = 0;
    for (; m + 3 <= M; m += 3, t++)
        tile_fp8(w, ldw, o, scale, scale_ld, block, X + m * ldx, ldx, 3, D, Y + m * ldy + o, ldy, next, t * share,
                 t == tiles - 1 ? D : (t + 1) * share);
    if (M - m == 2)
        tile_fp8(w, ldw, o, scale, scale_ld, block, X + m * ldx, ldx, 2, D, Y + m * ldy + o, ldy, next, t * share, D);
    if (M - m == 1)
        tile_fp8(w, ldw, o, scale, scale_ld, block, X + m * ldx, ldx, 1, D, Y + m * ldy + o, ldy, next, t * share, D);
}

/* Y [M, O] = X [M, D] . dequant(W [O, D] e4m3fn)^T. block must be 0 or a multiple of 8. */
void skinny_gemm_nt_fp8(const uint8_t *W, long O, long D, long ldw, const float *scale, long scale_ld, int block,
                        const float *X, long M, long ldx, float *Y, long ldy, int num_threads) {
    long blocks = (O + OB - 1) / OB;
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads)
    for (long b = 0; b < blocks; b++)
        weight_block_fp8(W, O, D, ldw, b * OB, scale, scale_ld, block, X, M, ldx, Y, ldy);
}

/* Every expert at once (as skinny_gemm_grouped_nt): W [L, O, D] e4m3 (expert stride lde), expert e's scales at
 * scale + e * scale_le in skinny_gemm_nt_fp8's layout. */
void skinny_gemm_grouped_fp8_nt(const uint8_t *W, long L, long O, long D, long ldw, long lde, const float *scale,
                                long scale_le, long scale_ld, int block, const float *X, const long *counts, long ldx,
                                float *Y, long ldy, int num_threads) {
    long starts[L > 0 ? L : 1];
    long rows = 0;
    for (long e = 0; e < L; e++) { starts[e] = rows; rows += counts[e]; }
    long blocks = (O + OB - 1) / OB;
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads)
    for (long eb = 0; eb < L * blocks; eb++) {
        long e = eb / blocks;
        if (counts[e] > 0)
            weight_block_fp8(W + e * lde, O, D, ldw, (eb % blocks) * OB, scale + e * scale_le, scale_ld, block,
                             X + starts[e] * ldx, counts[e], ldx, Y + starts[e] * ldy, ldy);
    }
}

/* OUT [O, D] (row stride ldo) = dequant(W [O, D] e4m3fn): the BLAS path's one pass over an expert's weights. */
void dequantize_fp8(const uint8_t *W, long O, long D, long ldw, const float *scale, long scale_ld, int block,
                    float *OUT, long ldo, int num_threads) {
    const float pow2_120 = FP8_POW2_120;
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads)
    for (long o = 0; o < O; o++) {
        const uint8_t *w = W + o * ldw;
        float *out = OUT + o * ldo;
        long d = 0;
        for (; d + 8 <= D; d += 8) {
            __m256 s = _mm256_set1_ps(row_scale(scale, scale_ld, block, o, d) * pow2_120);
            _mm256_storeu_ps(out + d, fp8x8_to_f32(w + d, s));
        }
        for (; d < D; d++) out[d] = fp8_to_f32(w[d]) * row_scale(scale, scale_ld, block, o, d);
    }
}
