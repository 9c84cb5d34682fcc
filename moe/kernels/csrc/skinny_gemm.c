/* Skinny GEMM for CPU decode: Y[m, o] = sum_d W[o, d] * X[m, d] for few token rows m (M <= ~16).
 *
 * W is an expert weight in [out, in] layout, far larger than the caches; X holds the M token rows routed
 * to that expert. BLAS sgemm repacks W on every call and runs this shape far below the FMA peak; here each
 * block of 4 weight rows is streamed from memory once, stays in L1, and is multiplied against the token
 * rows in register tiles of 4 weight rows x NX token rows (AVX2: NX <= 3, 12 accumulators + 3 loads + 1
 * weight vector in the 16 ymm registers; AVX-512, asked for per call where the CPU has it: NX <= 6, 24 + 6 + 1
 * of the 32 zmm). One driver splits (expert, weight-row block) pairs over OpenMP threads and runs one block
 * kernel, an instance of the tile template of its vector width for one weight format (fp32, or e4m3fn converted
 * in registers with per-channel or 128 x 128-block scales, fp8_e4m3.h), the format fixed at compile time.
 * The ISA changes the summation order (8 or 16 lanes): results are bit-identical between calls with the same
 * ISA, not across ISAs. AVX-512 on Zen 4 (2 threads): 1.2-1.3x the AVX2 tiles on weights in cache, 1.1-1.25x
 * streaming at 3-6 rows, the same at 1-2 rows (bandwidth-bound either way).
 */
#include <immintrin.h>
#include <stdint.h>

#include "fp8_e4m3.h"

#define OB 4
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define AVX512 __attribute__((target("avx512f")))

enum format { F32, E4M3 };

/* Where the weights come from: W [L, O, D] (row stride ldw, expert stride lde, in elements), fp32 or e4m3 with
 * expert e's scales at scale + e * scale_le: [O] (block == 0) or [ceil(O / block), ceil(D / block)] (row
 * stride scale_ld). */
typedef struct {
    const void *w;
    const float *scale;
    long ldw, lde, scale_ld, scale_le;
    int block;
    enum format format;
} weights;

/* One block of OB (or fewer) rows: row o of one expert, and that expert's scales. */
typedef struct {
    const char *w;
    const float *scale;
    long ldw, o, scale_ld;
    int block;
} rows;

ALWAYS_INLINE long elem_size(const int fmt) { return fmt == E4M3 ? 1 : 4; }

/* W[o + i, d] (times its scale): what the vector loads below give, one lane. */
ALWAYS_INLINE float weight_at(const int fmt, const rows *r, long i, long d) {
    if (fmt == F32) return ((const float *)r->w)[i * r->ldw + d];
    return fp8_to_f32((uint8_t)r->w[i * r->ldw + d]) * row_scale(r->scale, r->scale_ld, r->block, r->o + i, d);
}

ALWAYS_INLINE __m256 row_scale8(const rows *r, long i, long d) {
    return _mm256_set1_ps(row_scale(r->scale, r->scale_ld, r->block, r->o + i, d) * FP8_POW2_120);
}

/* 8 weights of the row at `row` from d: scale is row_scale8 (E4M3 only). */
ALWAYS_INLINE __m256 load8(const int fmt, const char *row, long d, __m256 scale) {
    if (fmt == F32) return _mm256_loadu_ps((const float *)row + d);
    return fp8x8_to_f32((const uint8_t *)row + d, scale);
}

AVX512 ALWAYS_INLINE __m512 row_scale16(const rows *r, long i, long d) {
    return _mm512_set1_ps(row_scale(r->scale, r->scale_ld, r->block, r->o + i, d) * FP8_POW2_120);
}

/* fp8x8_to_f32 with 16 lanes. */
AVX512 ALWAYS_INLINE __m512 load16(const int fmt, const char *row, long d, __m512 scale) {
    if (fmt == F32) return _mm512_loadu_ps((const float *)row + d);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + d)));
    const __m512i bits = _mm512_and_si512(_mm512_srai_epi32(_mm512_slli_epi32(b, 24), 4),
                                          _mm512_set1_epi32((int)0x87F00000));
    return _mm512_mul_ps(_mm512_castsi512_ps(bits), scale);
}

ALWAYS_INLINE float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* y[j * ldy + i] = dot(W[o + i], x[j]) for i < OB, j < NX (fmt and NX compile-time constants after inlining),
 * the d % 8 tail in scalar; meanwhile the lines [pf_lo, pf_hi) of the OB weight rows at `prefetch` are pulled
 * into L2, one 64-byte line per row every 2 (fp32) or 8 (e4m3) steps. */
ALWAYS_INLINE void tile8(const int fmt, const rows *r, const float *x, long ldx, const int NX, long D, float *y,
                         long ldy, const char *prefetch, long pf_lo, long pf_hi) {
    const long line = 64 / elem_size(fmt);
    const char *row[OB];
    __m256 acc[OB][3], sc[OB];
    for (int i = 0; i < OB; i++) {
        row[i] = r->w + i * r->ldw * elem_size(fmt);
        if (fmt == E4M3) sc[i] = row_scale8(r, i, 0);
        for (int j = 0; j < NX; j++) acc[i][j] = _mm256_setzero_ps();
    }
    long d = 0;
    for (; d + 8 <= D; d += 8) {
        /* a modulo, not tile16's counter: with the counter this loop ran 10-20% slower at NX = 2 (Zen 3) */
        if (fmt == E4M3 && r->block && d % r->block == 0 && d)
            for (int i = 0; i < OB; i++) sc[i] = row_scale8(r, i, d);
        __m256 xv[3];
        for (int j = 0; j < NX; j++) xv[j] = _mm256_loadu_ps(x + j * ldx + d);
        if (prefetch && (d & (line - 1)) == 0 && d >= pf_lo && d < pf_hi)
            for (int i = 0; i < OB; i++)
                _mm_prefetch(prefetch + (i * r->ldw + d) * elem_size(fmt), _MM_HINT_T1);
        for (int i = 0; i < OB; i++) {
            const __m256 wv = load8(fmt, row[i], d, sc[i]);
            for (int j = 0; j < NX; j++) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < OB; i++)
        for (int j = 0; j < NX; j++) {
            float s = hsum(acc[i][j]);
            for (long t = d; t < D; t++) s += weight_at(fmt, r, i, t) * x[j * ldx + t];
            y[j * ldy + i] = s;
        }
}

/* tile8 with 16-lane vectors; NX <= 6, block a multiple of 16, the scale blocks advanced by a counter (no
 * modulo per step); the prefetch one line per row every 1 (fp32) or 4 (e4m3) steps. */
AVX512 ALWAYS_INLINE void tile16(const int fmt, const rows *r, const float *x, long ldx, const int NX, long D,
                                 float *y, long ldy, const char *prefetch, long pf_lo, long pf_hi) {
    const char *row[OB];
    __m512 acc[OB][6], sc[OB];
    for (int i = 0; i < OB; i++) {
        row[i] = r->w + i * r->ldw * elem_size(fmt);
        if (fmt == E4M3) sc[i] = row_scale16(r, i, 0);
        for (int j = 0; j < NX; j++) acc[i][j] = _mm512_setzero_ps();
    }
    long d = 0, next_scale = r->block ? r->block : D; /* the d where the block scales change next */
    for (; d + 16 <= D; d += 16) {
        if (fmt == E4M3 && d == next_scale) {
            for (int i = 0; i < OB; i++) sc[i] = row_scale16(r, i, d);
            next_scale += r->block;
        }
        __m512 xv[6];
        for (int j = 0; j < NX; j++) xv[j] = _mm512_loadu_ps(x + j * ldx + d);
        if (prefetch && (fmt == F32 || (d & 63) == 0) && d >= pf_lo && d < pf_hi)
            for (int i = 0; i < OB; i++)
                _mm_prefetch(prefetch + (i * r->ldw + d) * elem_size(fmt), _MM_HINT_T1);
        for (int i = 0; i < OB; i++) {
            const __m512 wv = load16(fmt, row[i], d, sc[i]);
            for (int j = 0; j < NX; j++) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < OB; i++)
        for (int j = 0; j < NX; j++) {
            float s = _mm512_reduce_add_ps(acc[i][j]);
            for (long t = d; t < D; t++) s += weight_at(fmt, r, i, t) * x[j * ldx + t];
            y[j * ldy + i] = s;
        }
}

/* The prefetch of the next block is spread evenly over the token tiles: each pulls `share` elements of it
 * (whole lines) into L2, the last one the rest. Into L2, not L1: the block, the token rows and the next block
 * together overflow L1; with all of it issued by the first tile into L1 the kernel streamed 20-35% slower. */
ALWAYS_INLINE long prefetch_share(const int fmt, long D, long M, long nx) {
    const long line = 64 / elem_size(fmt);
    return (D / ((M + nx - 1) / nx) + line - 1) & ~(line - 1);
}

/* The OB rows at r against all M token rows, in tiles of 3 token rows and one of the 1-2 left. */
ALWAYS_INLINE void tiles8(const int fmt, const rows *r, const float *x, long ldx, long M, long D, float *y,
                          long ldy, const char *next) {
    const long tiles = (M + 2) / 3, share = prefetch_share(fmt, D, M, 3);
    long m = 0, t = 0;
    for (; m + 3 <= M; m += 3, t++)
        tile8(fmt, r, x + m * ldx, ldx, 3, D, y + m * ldy, ldy, next, t * share, t == tiles - 1 ? D : (t + 1) * share);
    if (M - m == 2) tile8(fmt, r, x + m * ldx, ldx, 2, D, y + m * ldy, ldy, next, t * share, D);
    if (M - m == 1) tile8(fmt, r, x + m * ldx, ldx, 1, D, y + m * ldy, ldy, next, t * share, D);
}

#define TAIL16(nx)                                                                                               \
    case nx: tile16(fmt, r, x + m * ldx, ldx, nx, D, y + m * ldy, ldy, next, t * share, D); break;

/* tiles8 with tiles of 6 token rows and one of the 1-5 left. */
AVX512 ALWAYS_INLINE void tiles16(const int fmt, const rows *r, const float *x, long ldx, long M, long D, float *y,
                                  long ldy, const char *next) {
    const long tiles = (M + 5) / 6, share = prefetch_share(fmt, D, M, 6);
    long m = 0, t = 0;
    for (; m + 6 <= M; m += 6, t++)
        tile16(fmt, r, x + m * ldx, ldx, 6, D, y + m * ldy, ldy, next, t * share, t == tiles - 1 ? D : (t + 1) * share);
    switch (M - m) { TAIL16(5) TAIL16(4) TAIL16(3) TAIL16(2) TAIL16(1) }
}

/* Blocks of fewer than OB rows (the end of W): one scalar dot product per output. */
ALWAYS_INLINE void rows_scalar(const int fmt, const rows *r, long nw, const float *x, long ldx, long M, long D,
                               float *y, long ldy) {
    for (long i = 0; i < nw; i++)
        for (long j = 0; j < M; j++) {
            float s = 0.0f;
            for (long t = 0; t < D; t++) s += weight_at(fmt, r, i, t) * x[j * ldx + t];
            y[j * ldy + i] = s;
        }
}

/* A block kernel: y[m][i] for the nw <= OB rows at r against the M token rows x, the rows at `next` (or none)
 * pulled into L2 meanwhile. */
typedef void (*block_kernel)(const rows *r, long nw, const float *x, long ldx, long M, long D, float *y, long ldy,
                             const char *next);

#define BLOCK_KERNEL(name, target, fmt, tiles)                                                                   \
    target static void name(const rows *r, long nw, const float *x, long ldx, long M, long D, float *y, long ldy, \
                            const char *next) {                                                                   \
        /* an e4m3 tile must not straddle two scale rows (never with a block a multiple of OB) */                 \
        if (nw < OB || (fmt == E4M3 && r->block && r->o / r->block != (r->o + OB - 1) / r->block))                \
            rows_scalar(fmt, r, nw, x, ldx, M, D, y, ldy);                                                        \
        else                                                                                                      \
            tiles(fmt, r, x, ldx, M, D, y, ldy, next);                                                            \
    }
BLOCK_KERNEL(f32_avx2, , F32, tiles8)
BLOCK_KERNEL(e4m3_avx2, , E4M3, tiles8)
BLOCK_KERNEL(f32_avx512, AVX512, F32, tiles16)
BLOCK_KERNEL(e4m3_avx512, AVX512, E4M3, tiles16)

/* 1 when the CPU has AVX-512F (the 16-lane tiles can run), else 0. */
int skinny_gemm_has_avx512(void) { return __builtin_cpu_supports("avx512f") ? 1 : 0; }

/* Every expert at once: Y[r] = X[r] . W[e]^T for the rows r of expert e, rows sorted by expert, counts[e] rows
 * each (all of them few). One parallel region over (expert, weight-row block) pairs instead of one call per
 * expert: with small experts the per-call cost (Python, thread wake-up) is what a decode step pays. avx512: 1
 * for the 16-lane tiles where the CPU has them (e4m3: with block a multiple of 16), 0 for the AVX2 ones. */
static void grouped(const weights *w, long L, long O, long D, const float *X, const long *counts, long ldx,
                    float *Y, long ldy, int num_threads, int avx512) {
    const int wide = avx512 && skinny_gemm_has_avx512() && w->block % 16 == 0;
    const block_kernel kernel = w->format == E4M3 ? (wide ? e4m3_avx512 : e4m3_avx2) : (wide ? f32_avx512 : f32_avx2);
    const long size = w->format == E4M3 ? 1 : 4, blocks = (O + OB - 1) / OB;
    long starts[L > 0 ? L : 1];
    for (long e = 0, start = 0; e < L; start += counts[e], e++) starts[e] = start;
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads)
    for (long eb = 0; eb < L * blocks; eb++) {
        const long e = eb / blocks, o = eb % blocks * OB;
        if (counts[e] == 0) continue;
        const rows r = {.w = (const char *)w->w + (e * w->lde + o * w->ldw) * size, .ldw = w->ldw, .o = o,
                        .scale = w->scale + e * w->scale_le, .scale_ld = w->scale_ld, .block = w->block};
        kernel(&r, O - o < OB ? O - o : OB, X + starts[e] * ldx, ldx, counts[e], D, Y + starts[e] * ldy + o, ldy,
               O - o >= 2 * OB ? r.w + OB * w->ldw * size : 0);
    }
}

/* fp32 W [L, O, D]; one expert (skinny_gemm in cpu_gemm.py) is L = 1 with counts = {M}. */
void skinny_gemm_grouped_nt(const float *W, long L, long O, long D, long ldw, long lde, const float *X,
                            const long *counts, long ldx, float *Y, long ldy, int num_threads, int avx512) {
    const weights w = {.w = W, .ldw = ldw, .lde = lde, .format = F32};
    grouped(&w, L, O, D, X, counts, ldx, Y, ldy, num_threads, avx512);
}

/* e4m3fn W [L, O, D] with scales in the layout of `weights`; block is 0 or a multiple of 8. */
void skinny_gemm_grouped_fp8_nt(const uint8_t *W, long L, long O, long D, long ldw, long lde, const float *scale,
                                long scale_le, long scale_ld, int block, const float *X, const long *counts, long ldx,
                                float *Y, long ldy, int num_threads, int avx512) {
    const weights w = {.w = W, .scale = scale, .ldw = ldw, .lde = lde, .scale_ld = scale_ld, .scale_le = scale_le,
                       .block = block, .format = E4M3};
    grouped(&w, L, O, D, X, counts, ldx, Y, ldy, num_threads, avx512);
}

/* ---- A decode-sized MoE layer in two calls (few rows per expert), around the activation done by the caller. ----
 * Part 1: stable counting sort of the N = T*K routed rows by expert (order[i] = routed pair of sorted row i,
 * pair n = t*K + k), the token rows gathered into xs, H = xs . W13[e]^T per expert block. Returns 0; -1 when an
 * expert would get more than max_rows rows (the caller's GEMMs are then faster); -2 for an id outside [0, E).
 * counts and order are written in every case, nothing else on failure. */
int moe_decode_up(const float *X, long T, long D, long ldx, const int32_t *ids, long K, const float *W13, long E,
                  long O, long ldw, long lde, long max_rows, long *order, long *counts, float *xs, float *H,
                  int num_threads, int avx512) {
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
    skinny_gemm_grouped_nt(W13, E, O, D, ldw, lde, xs, counts, D, H, O, num_threads, avx512);
    return 0;
}

/* Part 2: ys = A . W2[e]^T per expert block (A [N, F] sorted rows, after the activation), then
 * Y[t] = sum over k in order of weights[t, k] * ys[row of pair t*K+k], each product rounded before the add:
 * the order and rounding of moe.reference / all_to_all.dispatcher.weighted_sum. pos: N longs of scratch. */
void moe_decode_down(const float *A, long F, const float *W2, long D, long ldw, long lde, const long *counts,
                     long E, const long *order, const float *weights, long T, long K, long *pos, float *ys,
                     float *Y, int num_threads, int avx512) {
    const long N = T * K;
    skinny_gemm_grouped_nt(W2, E, D, F, ldw, lde, A, counts, F, ys, D, num_threads, avx512);
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

/* OUT [O, D] (row stride ldo) = dequant(W [O, D] e4m3fn): the BLAS path's one pass over an expert's weights
 * (AVX2 only: it runs at memory speed either way). */
void dequantize_fp8(const uint8_t *W, long O, long D, long ldw, const float *scale, long scale_ld, int block,
                    float *OUT, long ldo, int num_threads) {
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads)
    for (long o = 0; o < O; o++) {
        const rows r = {.w = (const char *)(W + o * ldw), .scale = scale, .scale_ld = scale_ld, .o = o, .block = block};
        float *out = OUT + o * ldo;
        long d = 0;
        for (; d + 8 <= D; d += 8) _mm256_storeu_ps(out + d, load8(E4M3, r.w, d, row_scale8(&r, 0, d)));
        for (; d < D; d++) out[d] = weight_at(E4M3, &r, 0, d);
    }
}
