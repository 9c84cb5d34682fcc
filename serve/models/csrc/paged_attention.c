// Decode attention straight from the paged KV cache (one query token per sequence), fp32, CPU.
//
// q: [B, H, D]; k, v: one layer of the cache, [Hkv, NB, BS, D] (head-major); tables: [B, M] block ids;
// lens: [B] keys per sequence; starts: [B] the first key each sequence's query sees (NULL: 0; a sliding or
// chunked window); sinks: [H] per-head logits that join each softmax's denominator with no value (NULL: none,
// gpt-oss's attention sinks); out: [B, H, D]. The G = H / Hkv query heads of a key/value head share each key
// read. Two passes per (sequence, kv head) over keys start .. len - 1: scores (q . k, scaled) -> softmax -> sum
// of p * v. No gather copy of the blocks and no padding to the longest sequence, which is what the torch path
// pays for.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

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

// In place: p = softmax(p) over n values, with an extra logit ``sink`` in the denominator (-INFINITY: none).
static void softmax(float *p, long n, float sink) {
    float m = sink, sum = 0.0f;
    long t = 0;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (; t + 8 <= n; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p + t));
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
    for (; t < n; t++) m = p[t] > m ? p[t] : m;
    t = 0;
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + t), vm));
        _mm256_storeu_ps(p + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    _mm256_storeu_ps(lanes, vsum);
    for (int i = 0; i < 8; i++) sum += lanes[i];
    for (; t < n; t++) sum += (p[t] = expf(p[t] - m));
    if (sink > -INFINITY) sum += expf(sink - m);
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

// Pull the block PREFETCH_AHEAD blocks on (BS rows of D floats) into L2 while the current one is computed: a
// sequence's blocks are scattered over the pool, so the hardware prefetcher does not see them coming. Measured on
// a cold 80 MB cache (default-model shapes): 1.7x the kernel without it; into L1, or 1 or 4 blocks on, gained
// less or nothing.
#define PREFETCH_AHEAD 2
ALWAYS_INLINE void prefetch_ahead(const float *head, const int64_t *table, long blk, long t, long L, long BS, long D) {
    if (t + PREFETCH_AHEAD * BS >= L) return;
    const float *block = head + table[blk + PREFETCH_AHEAD] * BS * D;
    for (long off = 0; off < BS * D; off += 16) _mm_prefetch((const char *)(block + off), _MM_HINT_T1);
}

// Keys s .. L - 1 of a sequence, block by block: the first may start mid-block (a window's first key).
#define FOR_KEY_RUNS(s, L, BS)                                                                           \
    for (long t = (s), blk = t / (BS), j0 = t % (BS), n = ((BS) - j0 < (L) - t ? (BS) - j0 : (L) - t); t < (L); \
         t += n, blk = t / (BS), j0 = t % (BS), n = ((BS) - j0 < (L) - t ? (BS) - j0 : (L) - t))

// The weighted sum in one register tile: NA (<= 8) accumulators, each a (query head, 8-column slice) pair (p_off:
// that head's row of p, v_off: the slice's column), updated from every value row in turn: each row is loaded
// once and the NA independent FMA chains hide the FMA latency.
// p holds keys s .. L - 1, one row of L - s per head.
ALWAYS_INLINE void pv_tile(const int NA, const float *p, const long *p_off, const long *v_off, long s, long L,
                           const float *vh, const int64_t *table, long BS, long D, float *out) {
    __m256 acc[8];
    for (int i = 0; i < NA; i++) acc[i] = _mm256_setzero_ps();
    FOR_KEY_RUNS(s, L, BS) {
        const float *vb = vh + (table[blk] * BS + j0) * D;
        prefetch_ahead(vh, table, blk, t, L, BS, D);
        for (long j = 0; j < n; j++) {
            const float *vt = vb + j * D, *pt = p + (t - s) + j;
            for (int i = 0; i < NA; i++)
                acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(pt + p_off[i]), _mm256_loadu_ps(vt + v_off[i]), acc[i]);
        }
    }
    for (int i = 0; i < NA; i++) _mm256_storeu_ps(out + p_off[i] / (L - s) * D + v_off[i], acc[i]);
}

// out[g, :] = sum_t p[g, t] v_t over the paged value rows when G * D <= 64 (all (head, 8-column slice) pairs fit
// one register tile): each value row is read once, the next block prefetched.
static void weighted_rows_one_tile(const float *p, long s, long L, long G, const float *vh, const int64_t *table,
                                   long BS, long D, float *out) {
    const long slices = D / 8;
    long p_off[8], v_off[8];
    for (long i = 0; i < G * slices; i++) {
        p_off[i] = i / slices * (L - s);
        v_off[i] = i % slices * 8;
    }
    switch (G * slices) {  // a constant tile width per case: the accumulators stay in registers
        case 8: pv_tile(8, p, p_off, v_off, s, L, vh, table, BS, D, out); break;
        case 7: pv_tile(7, p, p_off, v_off, s, L, vh, table, BS, D, out); break;
        case 6: pv_tile(6, p, p_off, v_off, s, L, vh, table, BS, D, out); break;
        case 5: pv_tile(5, p, p_off, v_off, s, L, vh, table, BS, D, out); break;
        case 4: pv_tile(4, p, p_off, v_off, s, L, vh, table, BS, D, out); break;
        case 3: pv_tile(3, p, p_off, v_off, s, L, vh, table, BS, D, out); break;
        case 2: pv_tile(2, p, p_off, v_off, s, L, vh, table, BS, D, out); break;
        default: pv_tile(1, p, p_off, v_off, s, L, vh, table, BS, D, out); break;
    }
}

// The same for G * D > 64: one (head, 8-column slice) pair at a time, its accumulator split four ways to hide the
// FMA latency; the pass re-reads the value rows from L2.
static void weighted_rows_by_slice(const float *p, long s, long L, long G, const float *vh, const int64_t *table,
                                   long BS, long D, float *out) {
    for (long c = 0; c < D; c += 8) {
        for (long g = 0; g < G; g++) {
            const float *pg0 = p + g * (L - s);
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            FOR_KEY_RUNS(s, L, BS) {
                const float *vb = vh + (table[blk] * BS + j0) * D + c, *pg = pg0 + (t - s);
                if (c == 0 && g == 0) prefetch_ahead(vh, table, blk, t, L, BS, D);
                long j = 0;
                for (; j + 4 <= n; j += 4) {
                    a0 = _mm256_fmadd_ps(_mm256_set1_ps(pg[j]), _mm256_loadu_ps(vb + j * D), a0);
                    a1 = _mm256_fmadd_ps(_mm256_set1_ps(pg[j + 1]), _mm256_loadu_ps(vb + (j + 1) * D), a1);
                    a2 = _mm256_fmadd_ps(_mm256_set1_ps(pg[j + 2]), _mm256_loadu_ps(vb + (j + 2) * D), a2);
                    a3 = _mm256_fmadd_ps(_mm256_set1_ps(pg[j + 3]), _mm256_loadu_ps(vb + (j + 3) * D), a3);
                }
                for (; j < n; j++) a0 = _mm256_fmadd_ps(_mm256_set1_ps(pg[j]), _mm256_loadu_ps(vb + j * D), a0);
            }
            _mm256_storeu_ps(out + g * D + c, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        }
    }
}

void paged_decode_attention(const float *q, const float *k, const float *v, long B, long H, long Hkv, long D,
                            long NB, long BS, const int64_t *tables, long M, const int64_t *lens,
                            const int64_t *starts, const float *sinks, float scale, float *out, int num_threads) {
    const long G = H / Hkv, head_stride = NB * BS * D;
    // small heads (G * D <= 64): the weighted sum in one register tile (each value row read once)
    const int one_tile = D % 8 == 0 && G * D <= 64;
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads)
    for (long b = 0; b < B; b++) {
        for (long hk = 0; hk < Hkv; hk++) {
            const long L = lens[b], s = starts ? starts[b] : 0, W = L - s;
            const float *qg = q + (b * H + hk * G) * D;
            const float *kh = k + hk * head_stride, *vh = v + hk * head_stride;
            const int64_t *table = tables + b * M;
            float *p = malloc(sizeof(float) * (G * W + G * D));
            float *acc = p + G * W;
            // 1. scores p[g, t - s] = scale * q_g . k_t
            FOR_KEY_RUNS(s, L, BS) {
                const float *kb = kh + (table[blk] * BS + j0) * D;
                prefetch_ahead(kh, table, blk, t, L, BS, D);
                for (long g = 0; g < G; g++) scores(qg + g * D, kb, n, D, scale, p + g * W + (t - s));
            }
            // 2. softmax over the window, per query head (its sink in the denominator)
            for (long g = 0; g < G; g++) softmax(p + g * W, W, sinks ? sinks[hk * G + g] : -INFINITY);
            // 3. out_g = sum_t p[g, t - s] v_t
            float *og = out + (b * H + hk * G) * D;
            if (D % 8 == 0) {
                (one_tile ? weighted_rows_one_tile : weighted_rows_by_slice)(p, s, L, G, vh, table, BS, D, og);
                free(p);
                continue;
            }
            for (long i = 0; i < G * D; i++) acc[i] = 0.0f;
            FOR_KEY_RUNS(s, L, BS) {
                const float *vb = vh + (table[blk] * BS + j0) * D;
                for (long j = 0; j < n; j++) {
                    const float *vt = vb + j * D;
                    for (long g = 0; g < G; g++) {
                        const float w = p[g * W + (t - s) + j];
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
