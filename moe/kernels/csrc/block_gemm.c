/* Grouped GEMM for CPU prefill-sized expert blocks: Y[r] = X[r] . W[e]^T for the rows r of expert e (rows sorted
 * by expert, counts[e] rows each, tens to thousands of them), fp32; AVX-512 where the CPU has it, else AVX2+FMA.
 *
 * GotoBLAS-style: per expert, every thread helps pack the expert's token rows into panels of MR rows
 * interleaved by k (xp[p][k][MR], the whole expert: read from L2/L3 while the weights stream), then the threads
 * split the output features in blocks of NR; each packs its block of weights as wp[k][NR] (NR rows of W read once
 * from memory, kept in L2) and runs the micro-kernel over every token panel. The micro-kernel holds an MR x NR
 * tile of Y in registers for the whole k block (vectors along the output features, one broadcast per token
 * row and k), so Y is written once per k block with plain vector stores. AVX-512: 12 x 32 (24 zmm accumulators,
 * two weight loads and twelve broadcasts per 24 FMAs); AVX2: 6 x 16 (12 ymm, two loads and six broadcasts per
 * 12 FMAs). K is blocked only beyond KC, where the weight block would leave L2.
 * FP8 (e4m3fn) weights are converted to fp32 while they are packed, so they are read once, as bytes, and the
 * micro-kernels are the same.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fp8_e4m3.h"

#define KC 4096 /* k block: the whole of K up to here (a 32 x 4096 weight block is 512 KB, within L2) */

typedef void (*micro_kernel)(long kc, const float *wp, const float *xp, float *y, long ldy, long rows, long cols,
                             int accumulate);

/* Writes (or adds) the first rows x cols of an MR x NR register tile spilled to t (row stride NR) into y. */
static void store_tile(const float *t, long nr, float *y, long ldy, long rows, long cols, int accumulate) {
    for (long r = 0; r < rows; r++, t += nr, y += ldy) {
        if (accumulate)
            for (long c = 0; c < cols; c++) y[c] += t[c];
        else
            memcpy(y, t, sizeof(float) * cols);
    }
}

/* The twelve (AVX2) or twenty-four (AVX-512) accumulators are named, not an array: with an array GCC 12 kept a
 * copy on the stack and stored to it every k step in some contexts (half the speed). */
#define AVX2_ROW(i)                                                                                              \
    b = _mm256_broadcast_ss(xp + i);                                                                             \
    c##i##0 = _mm256_fmadd_ps(b, w0, c##i##0), c##i##1 = _mm256_fmadd_ps(b, w1, c##i##1);
#define AVX2_SPILL(i) _mm256_store_ps(t + 16 * i, c##i##0), _mm256_store_ps(t + 16 * i + 8, c##i##1);

static void micro_avx2(long kc, const float *wp, const float *xp, float *y, long ldy, long rows, long cols,
                       int accumulate) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
           c40 = c00, c41 = c00, c50 = c00, c51 = c00, b;
    for (long k = 0; k < kc; k++, wp += 16, xp += 6) {
        const __m256 w0 = _mm256_load_ps(wp), w1 = _mm256_load_ps(wp + 8);
        AVX2_ROW(0) AVX2_ROW(1) AVX2_ROW(2) AVX2_ROW(3) AVX2_ROW(4) AVX2_ROW(5)
    }
    float t[6 * 16] __attribute__((aligned(64)));
    AVX2_SPILL(0) AVX2_SPILL(1) AVX2_SPILL(2) AVX2_SPILL(3) AVX2_SPILL(4) AVX2_SPILL(5)
    store_tile(t, 16, y, ldy, rows, cols, accumulate);
}

#define AVX512_ROW(i)                                                                                            \
    b = _mm512_set1_ps(xp[i]);                                                                                   \
    c##i##_0 = _mm512_fmadd_ps(b, w0, c##i##_0), c##i##_1 = _mm512_fmadd_ps(b, w1, c##i##_1);
#define AVX512_SPILL(i) _mm512_store_ps(t + 32 * i, c##i##_0), _mm512_store_ps(t + 32 * i + 16, c##i##_1);

__attribute__((target("avx512f"))) static void micro_avx512(long kc, const float *wp, const float *xp, float *y,
                                                             long ldy, long rows, long cols, int accumulate) {
    __m512 c0_0 = _mm512_setzero_ps(), c0_1 = c0_0, c1_0 = c0_0, c1_1 = c0_0, c2_0 = c0_0, c2_1 = c0_0,
           c3_0 = c0_0, c3_1 = c0_0, c4_0 = c0_0, c4_1 = c0_0, c5_0 = c0_0, c5_1 = c0_0, c6_0 = c0_0, c6_1 = c0_0,
           c7_0 = c0_0, c7_1 = c0_0, c8_0 = c0_0, c8_1 = c0_0, c9_0 = c0_0, c9_1 = c0_0, c10_0 = c0_0,
           c10_1 = c0_0, c11_0 = c0_0, c11_1 = c0_0, b;
    for (long k = 0; k < kc; k++, wp += 32, xp += 12) {
        const __m512 w0 = _mm512_load_ps(wp), w1 = _mm512_load_ps(wp + 16);
        AVX512_ROW(0) AVX512_ROW(1) AVX512_ROW(2) AVX512_ROW(3) AVX512_ROW(4) AVX512_ROW(5)
        AVX512_ROW(6) AVX512_ROW(7) AVX512_ROW(8) AVX512_ROW(9) AVX512_ROW(10) AVX512_ROW(11)
    }
    float t[12 * 32] __attribute__((aligned(64)));
    AVX512_SPILL(0) AVX512_SPILL(1) AVX512_SPILL(2) AVX512_SPILL(3) AVX512_SPILL(4) AVX512_SPILL(5)
    AVX512_SPILL(6) AVX512_SPILL(7) AVX512_SPILL(8) AVX512_SPILL(9) AVX512_SPILL(10) AVX512_SPILL(11)
    store_tile(t, 32, y, ldy, rows, cols, accumulate);
}

/* xp[k][i] = X[i][k] for the rows < mr of one token panel; zero past them (those tile rows are never stored). */
static void pack_tokens(const float *X, long ldx, long rows, long mr, long D, float *xp) {
    for (long k = 0; k < D; k++, xp += mr) {
        long i = 0;
        for (; i < rows; i++) xp[i] = X[i * ldx + k];
        for (; i < mr; i++) xp[i] = 0.0f;
    }
}

/* out[i * ldo + j] = in[j * ldi + i] for an 8 x 8 block, in registers. */
static void transpose8(const float *in, long ldi, float *out, long ldo) {
    __m256 r0 = _mm256_loadu_ps(in), r1 = _mm256_loadu_ps(in + ldi), r2 = _mm256_loadu_ps(in + 2 * ldi),
           r3 = _mm256_loadu_ps(in + 3 * ldi), r4 = _mm256_loadu_ps(in + 4 * ldi), r5 = _mm256_loadu_ps(in + 5 * ldi),
           r6 = _mm256_loadu_ps(in + 6 * ldi), r7 = _mm256_loadu_ps(in + 7 * ldi);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
           t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
           t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    r0 = _mm256_shuffle_ps(t0, t2, 0x44), r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    r2 = _mm256_shuffle_ps(t1, t3, 0x44), r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    r4 = _mm256_shuffle_ps(t4, t6, 0x44), r5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    r6 = _mm256_shuffle_ps(t5, t7, 0x44), r7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(r0, r4, 0x20));
    _mm256_storeu_ps(out + ldo, _mm256_permute2f128_ps(r1, r5, 0x20));
    _mm256_storeu_ps(out + 2 * ldo, _mm256_permute2f128_ps(r2, r6, 0x20));
    _mm256_storeu_ps(out + 3 * ldo, _mm256_permute2f128_ps(r3, r7, 0x20));
    _mm256_storeu_ps(out + 4 * ldo, _mm256_permute2f128_ps(r0, r4, 0x31));
    _mm256_storeu_ps(out + 5 * ldo, _mm256_permute2f128_ps(r1, r5, 0x31));
    _mm256_storeu_ps(out + 6 * ldo, _mm256_permute2f128_ps(r2, r6, 0x31));
    _mm256_storeu_ps(out + 7 * ldo, _mm256_permute2f128_ps(r3, r7, 0x31));
}

/* wp[k][j] = W[j][k0 + k] for the cols <= nr weight rows of one block; zero past them. 8 x 8 register
 * transposes (one vector load per row and 8 k, one vector store per k and 8 rows); scalar at the edges. */
static void pack_weights(const float *W, long ldw, long cols, long nr, long k0, long kc, float *wp) {
    W += k0;
    const long j8 = cols / 8 * 8, k8 = kc / 8 * 8;
    for (long j = 0; j < j8; j += 8)
        for (long k = 0; k < k8; k += 8) transpose8(W + j * ldw + k, ldw, wp + k * nr + j, nr);
    for (long k = 0; k < kc; k++) {
        for (long j = k < k8 ? j8 : 0; j < cols; j++) wp[k * nr + j] = W[j * ldw + k];
        for (long j = cols; j < nr; j++) wp[k * nr + j] = 0.0f;
    }
}

/* pack_weights for e4m3 rows: each 8 x 8 block converted (times its scale, scale_e as in fp8_e4m3.h) into a
 * float tile, then transposed; scalar at the edges. `block` must be 0 or a multiple of 8 (one scale per 8 k).
 * The scale pointers are found once per 8 rows and advanced at block boundaries: no division per element. */
static void pack_weights_fp8(const uint8_t *W, long ldw, long o, const float *scale_e, long scale_ld, int block,
                             long cols, long nr, long k0, long kc, float *wp) {
    const long j8 = cols / 8 * 8, k8 = kc / 8 * 8;
    float tile[8 * 8] __attribute__((aligned(32)));
    for (long j = 0; j < j8; j += 8) {
        const float *srow[8];
        for (long i = 0; i < 8; i++) srow[i] = block ? scale_e + (o + j + i) / block * scale_ld : scale_e + o + j + i;
        long kb = block ? k0 / block : 0, next = block ? (kb + 1) * block - k0 : kc;
        for (long k = 0; k < k8; k += 8) {
            if (k >= next) kb++, next += block;
            for (long i = 0; i < 8; i++) {
                const __m256 s = _mm256_set1_ps(srow[i][kb] * FP8_POW2_120);
                _mm256_store_ps(tile + 8 * i, fp8x8_to_f32(W + (j + i) * ldw + k0 + k, s));
            }
            transpose8(tile, 8, wp + k * nr + j, nr);
        }
    }
    for (long k = 0; k < kc; k++) {
        for (long j = k < k8 ? j8 : 0; j < cols; j++)
            wp[k * nr + j] = fp8_to_f32(W[j * ldw + k0 + k]) * row_scale(scale_e, scale_ld, block, o + j, k0 + k);
        for (long j = cols; j < nr; j++) wp[k * nr + j] = 0.0f;
    }
}

/* Where the weights come from: fp32 rows, or e4m3 rows with their scales (scale + e * scale_le per expert). */
typedef struct {
    const float *f32;
    const uint8_t *fp8;
    const float *scale;
    long ldw, lde, scale_ld, scale_le;
    int block;
} weights;

/* Rows o .. o + cols of expert e, k0 .. k0 + kc, packed as wp[k][nr]. */
static void pack_expert_rows(const weights *w, long e, long o, long cols, long nr, long k0, long kc, float *wp) {
    if (w->f32)
        pack_weights(w->f32 + e * w->lde + o * w->ldw, w->ldw, cols, nr, k0, kc, wp);
    else
        pack_weights_fp8(w->fp8 + e * w->lde + o * w->ldw, w->ldw, o, w->scale + e * w->scale_le, w->scale_ld,
                         w->block, cols, nr, k0, kc, wp);
}

static float *alloc_floats(long n) { /* 64-byte aligned; aligned_alloc wants a multiple of the alignment */
    return aligned_alloc(64, ((sizeof(float) * (n > 0 ? n : 1) + 63) / 64) * 64);
}

/* 1 when the CPU has AVX-512F (the 12 x 32 micro-kernel can run), else 0. */
int block_gemm_has_avx512(void) { return __builtin_cpu_supports("avx512f") ? 1 : 0; }

static int grouped(const weights *w, long L, long O, long D, const float *X, const long *counts, long ldx, float *Y,
                   long ldy, int num_threads, int avx512) {
    const int wide = avx512 && block_gemm_has_avx512();
    const micro_kernel micro = wide ? micro_avx512 : micro_avx2;
    const long mr = wide ? 12 : 6, nr = wide ? 32 : 16, kcap = D < KC ? D : KC;
    long most = 0;
    for (long e = 0; e < L; e++) most = counts[e] > most ? counts[e] : most;
    float *xp = alloc_floats((most + mr - 1) / mr * mr * D);
    float *wps = alloc_floats((long)num_threads * nr * kcap);
    if (!xp || !wps) {
        free(xp);
        free(wps);
        return -1;
    }
#pragma omp parallel num_threads(num_threads)
    {
        float *wp = wps;
#ifdef _OPENMP
        wp += (long)omp_get_thread_num() * nr * kcap;
#endif
        long start = 0;
        for (long e = 0; e < L; start += counts[e], e++) {
            const long M = counts[e], panels = (M + mr - 1) / mr, blocks = (O + nr - 1) / nr;
            if (M == 0) continue;
            const float *Xe = X + start * ldx;
            float *Ye = Y + start * ldy;
#pragma omp for schedule(static)
            for (long p = 0; p < panels; p++) {
                const long rows = M - p * mr < mr ? M - p * mr : mr;
                pack_tokens(Xe + p * mr * ldx, ldx, rows, mr, D, xp + p * mr * D);
            }
            /* implicit barrier: every panel packed; then the blocks of output features split over the threads */
#pragma omp for schedule(static)
            for (long b = 0; b < blocks; b++) {
                const long o = b * nr, cols = O - o < nr ? O - o : nr;
                for (long k0 = 0; k0 < D; k0 += kcap) {
                    const long kc = D - k0 < kcap ? D - k0 : kcap;
                    pack_expert_rows(w, e, o, cols, nr, k0, kc, wp);
                    for (long p = 0; p < panels; p++) {
                        const long rows = M - p * mr < mr ? M - p * mr : mr;
                        micro(kc, wp, xp + p * mr * D + k0 * mr, Ye + p * mr * ldy + o, ldy, rows, cols, k0 > 0);
                    }
                }
            }
            /* implicit barrier: nobody repacks xp while another thread still reads it */
        }
    }
    free(xp);
    free(wps);
    return 0;
}

/* avx512: 1 for the 12 x 32 micro-kernel (only where block_gemm_has_avx512()), 0 for the 6 x 16 AVX2 one.
 * Returns 0, or -1 (nothing written) if the packing buffers cannot be allocated. */
int block_gemm_grouped_nt(const float *W, long L, long O, long D, long ldw, long lde, const float *X,
                          const long *counts, long ldx, float *Y, long ldy, int num_threads, int avx512) {
    const weights w = {.f32 = W, .ldw = ldw, .lde = lde};
    return grouped(&w, L, O, D, X, counts, ldx, Y, ldy, num_threads, avx512);
}

/* The same with e4m3fn weights W [L, O, D] converted while they are packed (each read once, as bytes): scale
 * + e * scale_le is expert e's [O] (block == 0) or [ceil(O / block), ceil(D / block)] (row stride scale_ld)
 * grid; block is 0 or a multiple of 8. */
int block_gemm_grouped_fp8_nt(const uint8_t *W, long L, long O, long D, long ldw, long lde, const float *scale,
                              long scale_le, long scale_ld, int block, const float *X, const long *counts, long ldx,
                              float *Y, long ldy, int num_threads, int avx512) {
    const weights w = {.fp8 = W, .scale = scale, .ldw = ldw, .lde = lde, .scale_ld = scale_ld, .scale_le = scale_le,
                       .block = block};
    return grouped(&w, L, O, D, X, counts, ldx, Y, ldy, num_threads, avx512);
}
