/* e4m3fn -> fp32 for the CPU kernels (skinny_gemm.c, block_gemm.c).
 * Move sign to bit 31 and exponent+mantissa to bits 20..26, then multiply by 2^120 to move the exponent bias
 * from 7 to 127 (subnormals come out right too). The vector form takes the 2^120 folded into its scale.
 * Scales: block == 0: one per weight row (scale[o]); else one per (block x block) tile,
 * scale[(o / block) * scale_ld + d / block] (DeepSeek-V3 weight_scale_inv layout). */
#ifndef MOE_FP8_E4M3_H
#define MOE_FP8_E4M3_H
#include <immintrin.h>
#include <stdint.h>

#define FP8_POW2_120 1.329227995784916e+36f

/* 8 e4m3 bytes at p -> 8 floats times `scale` (which must include the 2^120). */
static inline __attribute__((always_inline)) __m256 fp8x8_to_f32(const uint8_t *p, __m256 scale) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i bits = _mm256_and_si256(_mm256_srai_epi32(_mm256_slli_epi32(b, 24), 4), _mm256_set1_epi32((int)0x87F00000));
    return _mm256_mul_ps(_mm256_castsi256_ps(bits), scale);
}

static inline __attribute__((always_inline)) float fp8_to_f32(uint8_t v) {
    union { uint32_t u; float f; } c;
    c.u = ((uint32_t)(v & 0x80) << 24) | ((uint32_t)(v & 0x7F) << 20);
    return c.f * FP8_POW2_120;
}

static inline __attribute__((always_inline)) float row_scale(const float *scale, long scale_ld, int block, long o,
                                                             long d) {
    return block ? scale[(o / block) * scale_ld + d / block] : scale[o];
}
#endif
