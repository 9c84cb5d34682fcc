// A whole decode step of a GQA + MoE decoder in one call, fp32, CPU: embedding, every layer (RMSNorm, qkv
// projection, per-head q/k norms and NeoX RoPE, the paged K/V write, paged attention, output projection, RMSNorm,
// softmax top-k router, SwiGLU experts or a dense SwiGLU MLP, residuals), the final norm and the logits of the rows
// that sample. At decode sizes the same work as ~15 torch ops per layer costs more in dispatch than in arithmetic
// (the default model's batch-1 step: ~2.7 ms through torch, its arithmetic well under a millisecond). An expert's
// rows of the step go through it together, each weight row read once for all of them.
//
// It reuses the layer ops of decode_ops.c (rms_norm, qk_norm_rope), paged_attention.c (the decode kernel) and the MoE
// layer's moe_decode.c (router, experts, the GEMV); the projections are GEMVs over [out, in] weights, each weight
// row read once for all rows of the step.
//
// shape: D, H, Hkv, Dh, R (rotary dims), E, K (top-k), V, L (layers), NB (pool blocks incl. the null one), BS,
// M (block-table width), renormalize (0/1). layers: L rows of LAYER_PTRS pointers (see enum), ffn: L rows of
// (F, is_moe). KV pool: [2, L, Hkv, NB, BS, Dh]. Per step: B rows of (id, position, slot, table [M], len); S rows
// sample (sample_rows), their logits [S, V]. Routing out: ids [L, B, K], weights [L, B, K], logits [L, B, E].
// Overlapped steps (serve.engine.overlap): an id -(j + 1) is a pending token, prev_tokens[j] (the previous step's
// sampled row j; NULL: no pending ids); argmax_out (NULL: none) gets each sampled row's greedy token, as the
// sampler's (greedy.c), computed while the logits are still in cache.
#include "decode_ops.c"
#include "paged_attention.c"
#include "../../../moe/kernels/csrc/moe_decode.c"
#include "../../engine/csrc/greedy.c"

enum { IN_NORM, QKV, Q_NORM, K_NORM, O_PROJ, POST_NORM, ROUTER, W13, W2, LAYER_PTRS };
enum { S_D, S_H, S_HKV, S_DH, S_R, S_E, S_K, S_V, S_L, S_NB, S_BS, S_M, S_RENORM, S_FIELDS };

void decode_step(const int64_t *shape, float eps, const float *const *layers, const int64_t *ffn,
                 const float *embed, const float *final_norm, const float *lm_head, const float *cos_table,
                 const float *sin_table, float *kv_pool, long B, const int64_t *ids, const int64_t *positions,
                 const int64_t *slots, const int64_t *tables, const int64_t *lens, long S, const int64_t *sample_rows,
                 float *logits_out, int32_t *route_ids, float *route_weights, float *route_logits, int nt,
                 const int64_t *prev_tokens, int64_t *argmax_out) {
    const long D = shape[S_D], H = shape[S_H], Hkv = shape[S_HKV], Dh = shape[S_DH], R = shape[S_R];
    const long E = shape[S_E], K = shape[S_K], V = shape[S_V], L = shape[S_L], NB = shape[S_NB], BS = shape[S_BS];
    const long M = shape[S_M], Q = H * Dh, KV = Hkv * Dh, QKV_ROWS = Q + 2 * KV;
    long F_max = 0;
    for (long l = 0; l < L; l++) F_max = ffn[2 * l] > F_max ? ffn[2 * l] : F_max;
    const long layer_stride = Hkv * NB * BS * Dh, head_stride = NB * BS * Dh;
    // x, h, qkv, q, k, o, cos, sin; then the feed-forward's xs, ys [B, D], hs [B, 2F] and ws [B] (an expert gets
    // at most one row per token), and its rows [B]
    float *x = malloc(sizeof(float) * B * (2 * D + QKV_ROWS + 2 * Q + KV + 2 * R + 2 * D + 2 * F_max + 1));
    int64_t *rows = malloc(sizeof(int64_t) * B);
    float *h = x + B * D, *qkv = h + B * D, *q = qkv + B * QKV_ROWS, *k = q + B * Q, *o = k + B * KV;
    float *cos = o + B * Q, *sin = cos + B * R, *ffn_scratch = sin + B * R;
    for (long b = 0; b < B; b++) {
        const int64_t id = ids[b] >= 0 ? ids[b] : prev_tokens[-ids[b] - 1];
        for (long i = 0; i < D; i++) x[b * D + i] = embed[id * D + i];
        for (long i = 0; i < R; i++) {
            cos[b * R + i] = cos_table[positions[b] * R + i];
            sin[b * R + i] = sin_table[positions[b] * R + i];
        }
    }
    for (long l = 0; l < L; l++) {
        const float *const *w = layers + l * LAYER_PTRS;
        const long F = ffn[2 * l], is_moe = ffn[2 * l + 1];
        float *k_cache = kv_pool + l * layer_stride, *v_cache = kv_pool + (L + l) * layer_stride;
        // attention: x += o_proj(attention(rope(norms(qkv(rms_norm(x))))))
        rms_norm(x, w[IN_NORM], B, D, eps, h);
        gemv(w[QKV], QKV_ROWS, D, h, B, D, qkv, QKV_ROWS, nt);
        qk_norm_rope(qkv, B, H, Hkv, Dh, R, w[Q_NORM], w[K_NORM], eps, cos, sin, q, k);
        for (long b = 0; b < B; b++) {
            for (long hk = 0; hk < Hkv; hk++) {
                const float *kb = k + (b * Hkv + hk) * Dh, *vb = qkv + b * QKV_ROWS + Q + KV + hk * Dh;
                for (long i = 0; i < Dh; i++) {
                    k_cache[hk * head_stride + slots[b] * Dh + i] = kb[i];
                    v_cache[hk * head_stride + slots[b] * Dh + i] = vb[i];
                }
            }
        }
        paged_decode_attention(q, k_cache, v_cache, B, H, Hkv, Dh, NB, BS, tables, M, lens, NULL, NULL,
                               1.0f / sqrtf((float)Dh), o, nt);
        gemv(w[O_PROJ], D, Q, o, B, Q, h, D, nt);
        for (long i = 0; i < B * D; i++) x[i] += h[i];
        // feed-forward: x += moe(rms_norm(x)) or dense(rms_norm(x)); an expert's rows go through it together
        rms_norm(x, w[POST_NORM], B, D, eps, h);
        if (!is_moe) {
            float *ys = ffn_scratch, *hs = ys + B * D;
            swiglu_rows(w[W13], w[W2], F, D, h, B, hs, ys, nt);
            for (long i = 0; i < B * D; i++) x[i] += ys[i];
            continue;
        }
        moe_rows(h, B, D, w[ROUTER], E, K, (int)shape[S_RENORM], w[W13], w[W2], F, x, route_ids + l * B * K,
                 route_weights + l * B * K, route_logits + l * B * E, ffn_scratch, rows, nt);
    }
    // final norm and the logits of the rows that sample
    for (long s = 0; s < S; s++) rms_norm(x + sample_rows[s] * D, final_norm, 1, D, eps, h + s * D);
    gemv(lm_head, V, D, h, S, D, logits_out, V, nt);
    if (argmax_out != NULL) argmax_rows(logits_out, S, V, V, argmax_out);
    free(rows);
    free(x);
}
// decode_worker_launch / _wait: the same step on a thread of its own, for the engine to overlap with it
#include "decode_worker.c"
