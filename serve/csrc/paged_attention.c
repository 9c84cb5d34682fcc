// Decode attention straight from the paged KV cache (one query token per sequence), fp32, CPU.
//
// q: [B, H, D]; k, v: one layer of the cache, [Hkv, NB, BS, D] (head-major); tables: [B, M] block ids;
// lens: [B] keys per sequence; out: [B, H, D]. The G = H / Hkv query heads of a key/value head share each key
// read. Two passes per (sequence, kv head): scores (q . k, scaled) -> softmax -> sum of p * v. No gather copy
// of the blocks and no padding to the longest sequence, which is what the torch path pays for.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float dot(const float *restrict a, const float *restrict b, long n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (long i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

// exp(x) for x <= 0 (softmax after subtracting the max): x = n ln2 + r, exp(r) by a degree-6 polynomial
// (Cephes' expf coefficients; relative error ~1e-7), 2^n through the exponent bits. Inputs below -87 give 0.
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// In place: p = softmax(p) over n values.
static void softmax(float *p, long n) {
    float m = -INFINITY, sum = 0.0f;
    for (long t = 0; t < n; t++) m = p[t] > m ? p[t] : m;
    long t = 0;
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + t), vm));
        _mm256_storeu_ps(p + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vsum);
    for (int i = 0; i < 8; i++) sum += lanes[i];
    for (; t < n; t++) sum += (p[t] = expf(p[t] - m));
    const float inv = 1.0f / sum;
    for (t = 0; t < n; t++) p[t] *= inv;
}

// Sum of each of eight vectors, as one vector: [sum(a0), ..., sum(a7)].
static inline __m256 sum8x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                            __m256 a7) {
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// scores[j] = scale * q . k_j for n consecutive key rows (D floats each); eight keys at a time when D % 8 == 0.
static void scores(const float *restrict q, const float *restrict k, long n, long D, float scale,
                   float *restrict out) {
    long j = 0;
    if (D % 8 == 0) {
        const __m256 vscale = _mm256_set1_ps(scale);
        for (; j + 8 <= n; j += 8) {
            const float *kj = k + j * D;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
            for (long c = 0; c < D; c += 8) {
                const __m256 qc = _mm256_loadu_ps(q + c);
                a0 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kj + c), a0);
                a1 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kj + D + c), a1);
                a2 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kj + 2 * D + c), a2);
                a3 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kj + 3 * D + c), a3);
                a4 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kj + 4 * D + c), a4);
                a5 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kj + 5 * D + c), a5);
                a6 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kj + 6 * D + c), a6);
                a7 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kj + 7 * D + c), a7);
            }
            _mm256_storeu_ps(out + j, _mm256_mul_ps(vscale, sum8x8(a0, a1, a2, a3, a4, a5, a6, a7)));
        }
    }
    for (; j < n; j++) out[j] = scale * dot(q, k + j * D, D);
}

// out[g, :] = sum_t p[g, t] v_t over the paged value rows, D % 8 == 0: one 8-wide column slice at a time,
// kept in registers (four accumulators hide the FMA latency).
static void weighted_rows(const float *p, long L, long G, const float *vh, const int64_t *table, long BS, long D,
                          float *out) {
    for (long c = 0; c < D; c += 8) {
        for (long g = 0; g < G; g++) {
            const float *pg = p + g * L;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (long blk = 0, t = 0; t < L; blk++, t += BS) {
                const float *vb = vh + table[blk] * BS * D + c;
                const long n = L - t < BS ? L - t : BS;
                long j = 0;
                for (; j + 4 <= n; j += 4) {
                    a0 = _mm256_fmadd_ps(_mm256_set1_ps(pg[t + j]), _mm256_loadu_ps(vb + j * D), a0);
                    a1 = _mm256_fmadd_ps(_mm256_set1_ps(pg[t + j + 1]), _mm256_loadu_ps(vb + (j + 1) * D), a1);
                    a2 = _mm256_fmadd_ps(_mm256_set1_ps(pg[t + j + 2]), _mm256_loadu_ps(vb + (j + 2) * D), a2);
                    a3 = _mm256_fmadd_ps(_mm256_set1_ps(pg[t + j + 3]), _mm256_loadu_ps(vb + (j + 3) * D), a3);
                }
                for (; j < n; j++) a0 = _mm256_fmadd_ps(_mm256_set1_ps(pg[t + j]), _mm256_loadu_ps(vb + j * D), a0);
            }
            _mm256_storeu_ps(out + g * D + c, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        }
    }
}

void paged_decode_attention(const float *q, const float *k, const float *v, long B, long H, long Hkv, long D,
                            long NB, long BS, const int64_t *tables, long M, const int64_t *lens, float scale,
                            float *out, int num_threads) {
    const long G = H / Hkv, head_stride = NB * BS * D;
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads)
    for (long b = 0; b < B; b++) {
        for (long hk = 0; hk < Hkv; hk++) {
            const long L = lens[b];
            const float *qg = q + (b * H + hk * G) * D;
            const float *kh = k + hk * head_stride, *vh = v + hk * head_stride;
            const int64_t *table = tables + b * M;
            float *p = malloc(sizeof(float) * (G * L + G * D));
            float *acc = p + G * L;
            // 1. scores p[g, t] = scale * q_g . k_t
            for (long blk = 0, t = 0; t < L; blk++, t += BS) {
                const float *kb = kh + table[blk] * BS * D;
                const long n = L - t < BS ? L - t : BS;
                for (long g = 0; g < G; g++) scores(qg + g * D, kb, n, D, scale, p + g * L + t);
            }
            // 2. softmax over t, per query head
            for (long g = 0; g < G; g++) softmax(p + g * L, L);
            // 3. out_g = sum_t p[g, t] v_t
            float *og = out + (b * H + hk * G) * D;
            if (D % 8 == 0) {
                weighted_rows(p, L, G, vh, table, BS, D, og);
                free(p);
                continue;
            }
            for (long i = 0; i < G * D; i++) acc[i] = 0.0f;
            for (long blk = 0, t = 0; t < L; blk++) {
                const float *vb = vh + table[blk] * BS * D;
                for (long j = 0; j < BS && t < L; j++, t++) {
                    const float *vt = vb + j * D;
                    for (long g = 0; g < G; g++) {
                        const float w = p[g * L + t];
                        float *ag = acc + g * D;
#pragma omp simd
                        for (long i = 0; i < D; i++) ag[i] += w * vt[i];
                    }
                }
            }
            for (long i = 0; i < G * D; i++) og[i] = acc[i];
            free(p);
        }
    }
}
