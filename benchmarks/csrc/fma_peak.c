/* The CPU's fp32 FMA peak, measured: each of num_threads threads runs `iters` steps of 12 independent FMA chains
 * (enough to cover the FMA latency on every x86 core we know), 256-bit or, where the CPU has AVX-512F,
 * 512-bit vectors. FLOPs = num_threads * iters * 12 * lanes * 2; the return value keeps the work observable. */
#include <immintrin.h>

#define CHAINS(T, FMA, SET1)                                                                                    \
    T a0 = SET1(1.0f), a1 = SET1(1.1f), a2 = SET1(1.2f), a3 = SET1(1.3f), a4 = SET1(1.4f), a5 = SET1(1.5f),   \
      a6 = SET1(1.6f), a7 = SET1(1.7f), a8 = SET1(1.8f), a9 = SET1(1.9f), a10 = SET1(2.0f), a11 = SET1(2.1f); \
    const T m = SET1(0.999999f), c = SET1(1e-7f);                                                             \
    for (long i = 0; i < iters; i++) {                                                                        \
        a0 = FMA(a0, m, c), a1 = FMA(a1, m, c), a2 = FMA(a2, m, c), a3 = FMA(a3, m, c);                       \
        a4 = FMA(a4, m, c), a5 = FMA(a5, m, c), a6 = FMA(a6, m, c), a7 = FMA(a7, m, c);                       \
        a8 = FMA(a8, m, c), a9 = FMA(a9, m, c), a10 = FMA(a10, m, c), a11 = FMA(a11, m, c);                   \
    }

static float chains256(long iters) {
    CHAINS(__m256, _mm256_fmadd_ps, _mm256_set1_ps)
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    float out[8];
    _mm256_storeu_ps(out, s);
    return out[0];
}

__attribute__((target("avx512f"))) static float chains512(long iters) {
    CHAINS(__m512, _mm512_fmadd_ps, _mm512_set1_ps)
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
    return _mm512_reduce_add_ps(s);
}

/* Lanes per vector of the widest FMA this CPU runs (16 or 8). */
int fma_lanes(void) { return __builtin_cpu_supports("avx512f") ? 16 : 8; }

float fma_peak(long iters, int num_threads, int lanes) {
    float total = 0.0f;
#pragma omp parallel num_threads(num_threads) reduction(+ : total)
    total += lanes == 16 ? chains512(iters) : chains256(iters);
    return total;
}
