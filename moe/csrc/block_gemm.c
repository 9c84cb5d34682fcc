/* Grouped GEMM for CPU prefill-sized expert blocks: Y[r] = X[r] . W[e]^T for the rows r of expert e (rows sorted
 * by expert, counts[e] rows each, tens to thousands of them), fp32, AVX2 + FMA.
 *
 * Both operands are K-contiguous ([out, in] weights, token rows). The micro-kernel keeps a 6 x 16 tile of
 * Y^T (6 weight rows x 16 token rows) in 12 ymm registers; per k it loads 16 token values from a packed,
 * transposed copy of X (xt: for each k, 16 consecutive rows) and broadcasts one value from each of the 6 weight
 * rows (packed per tile, [k][6]: read from L1/L2 while every token panel passes under it), so the weights
 * are read from memory once per call and Y once per k block. K is blocked by KC only beyond 4096: at
 * D = 1024 / F = 2816 whole-K tiles measured 10-40% faster than L1-sized k blocks (fewer passes over Y).
 * Threads split each expert's weight rows; they pack the expert's token panels together first.
 */
#include <immintrin.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define NR 6    /* weight rows per micro-tile */
#define MR 16   /* token rows per micro-tile (two ymm) */
#define KC 4096  /* k block: the whole of K up to 4096 (measured: Y written once beats L1-sized 256-blocks) */

/* xt[p][k][0..MR) = X[p*MR + i][k0 + k] for the token panels of one expert; zero past the last row. */
static void pack_panel(const float *X, long ldx, long rows, long k0, long kc, float *xt) {
    for (long k = 0; k < kc; k++) {
        float *dst = xt + k * MR;
        long i = 0;
        for (; i < rows; i++) dst[i] = X[i * ldx + k0 + k];
        for (; i < MR; i++) dst[i] = 0.0f;
    }
}

/* wp[k][i] = W[i][k0 + k] for the nr <= NR weight rows of one micro-tile (rows past nr: zero). */
static void pack_rows(const float *w, long ldw, long nr, long k0, long kc, float *wp) {
    for (long i = 0; i < NR; i++)
        for (long k = 0; k < kc; k++) wp[k * NR + i] = i < nr ? w[i * ldw + k0 + k] : 0.0f;
}

/* Y^T tile [nr <= NR weight rows] x [mr <= MR token rows] over one k block; accumulate into Y unless first. */
/* Y^T tile [nr <= NR weight rows] x [mr <= MR token rows] over one k block; accumulate into Y unless first.
 * Twelve named accumulators rather than an array: with an array GCC 12 kept a copy of it on the stack and
 * stored to it every k step in some contexts (half the speed). */
static void micro_tile(long kc, const float *wp, long nr, const float *xt, float *y, long ldy, long mr, int first) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00,
           a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    for (long k = 0; k < kc; k++, xt += MR, wp += NR) {
        const __m256 x0 = _mm256_load_ps(xt), x1 = _mm256_load_ps(xt + 8);
        __m256 b = _mm256_broadcast_ss(wp);
        a00 = _mm256_fmadd_ps(b, x0, a00), a01 = _mm256_fmadd_ps(b, x1, a01);
        b = _mm256_broadcast_ss(wp + 1);
        a10 = _mm256_fmadd_ps(b, x0, a10), a11 = _mm256_fmadd_ps(b, x1, a11);
        b = _mm256_broadcast_ss(wp + 2);
        a20 = _mm256_fmadd_ps(b, x0, a20), a21 = _mm256_fmadd_ps(b, x1, a21);
        b = _mm256_broadcast_ss(wp + 3);
        a30 = _mm256_fmadd_ps(b, x0, a30), a31 = _mm256_fmadd_ps(b, x1, a31);
        b = _mm256_broadcast_ss(wp + 4);
        a40 = _mm256_fmadd_ps(b, x0, a40), a41 = _mm256_fmadd_ps(b, x1, a41);
        b = _mm256_broadcast_ss(wp + 5);
        a50 = _mm256_fmadd_ps(b, x0, a50), a51 = _mm256_fmadd_ps(b, x1, a51);
    }
    float tile[NR][MR] __attribute__((aligned(32)));
    const __m256 acc[NR][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
    for (int i = 0; i < NR; i++) {
        _mm256_store_ps(tile[i], acc[i][0]);
        _mm256_store_ps(tile[i] + 8, acc[i][1]);
    }
    for (long m = 0; m < mr; m++)
        for (long i = 0; i < nr; i++) y[m * ldy + i] = first ? tile[i][m] : y[m * ldy + i] + tile[i][m];
}

static float *alloc_floats(long n) {  /* 64-byte aligned; aligned_alloc wants a multiple of the alignment */
    return aligned_alloc(64, ((sizeof(float) * (n > 0 ? n : 1) + 63) / 64) * 64);
}

/* Returns 0, or -1 (nothing written) if the scratch buffers cannot be allocated. */
int block_gemm_grouped_nt(const float *W, long L, long O, long D, long ldw, long lde, const float *X,
                          const long *counts, long ldx, float *Y, long ldy, int num_threads) {
    long most = 0;
    for (long e = 0; e < L; e++) most = counts[e] > most ? counts[e] : most;
    const long kcap = D < KC ? D : KC, panel = MR * kcap;
    float *xt = alloc_floats((most + MR - 1) / MR * panel);
    float *wps = alloc_floats((long)num_threads * NR * kcap);
    if (!xt || !wps) {
        free(xt);
        free(wps);
        return -1;
    }
#pragma omp parallel num_threads(num_threads)
    {
        float *wp = wps;
#ifdef _OPENMP
        wp += (long)omp_get_thread_num() * NR * kcap;
#endif
        long start = 0;
        for (long e = 0; e < L; start += counts[e], e++) {
            const long M = counts[e], panels = (M + MR - 1) / MR, blocks = (O + NR - 1) / NR;
            if (M == 0) continue;
            const float *We = W + e * lde, *Xe = X + start * ldx;
            float *Ye = Y + start * ldy;
            for (long k0 = 0; k0 < D; k0 += kcap) {
                const long kc = D - k0 < kcap ? D - k0 : kcap;
#pragma omp for schedule(static)
                for (long p = 0; p < panels; p++) {
                    const long rows = M - p * MR < MR ? M - p * MR : MR;
                    pack_panel(Xe + p * MR * ldx, ldx, rows, k0, kc, xt + p * panel);
                }
                /* implicit barrier: every panel packed; then the weight-row blocks split over the threads */
#pragma omp for schedule(static)
                for (long b = 0; b < blocks; b++) {
                    const long o = b * NR, nr = O - o < NR ? O - o : NR;
                    pack_rows(We + o * ldw, ldw, nr, k0, kc, wp);
                    for (long p = 0; p < panels; p++) {
                        const long mr = M - p * MR < MR ? M - p * MR : MR;
                        micro_tile(kc, wp, nr, xt + p * panel, Ye + p * MR * ldy + o, ldy, mr, k0 == 0);
                    }
                }
                /* implicit barrier: nobody repacks xt while another thread still reads it */
            }
        }
    }
    free(xt);
    free(wps);
    return 0;
}
