/* One Mixtral MoE layer in ggml, op for op what llama.cpp's llm_graph_context::build_moe_ffn builds for
 * Mixtral (softmax gating, top-k, renormalised weights, SwiGLU experts, no biases, no shared expert):
 *   logits = gate_inp x; probs = soft_max; sel = argsort_top_k(probs, K); w = get_rows(probs, sel) / sum;
 *   up = mul_mat_id(up_exps, x, sel); gate = mul_mat_id(gate_exps, x, sel); h = swiglu_split(gate, up);
 *   y = mul_mat_id(down_exps, h, sel) * w; out = sum over the K slots (ggml_add of views).
 * Run by benchmarks/peers/moe_layer_bench.py; built against the install_llamacpp.sh build's libggml:
 *   gcc -O2 ggml_moe.c -I$SRC/ggml/include -L$BUILD/bin -lggml -lggml-base -lggml-cpu -Wl,-rpath,$BUILD/bin
 *   ggml_moe WEIGHTS.f32 D F E K T ITERS THREADS OUT.f32
 * WEIGHTS.f32: router [E, D], up [E, F, D], gate [E, F, D], down [E, D, F], x [T, D], row-major fp32 (torch's
 * [out, in] layouts, which are ggml's ne = {in, out, E}). Writes the output [T, D] to OUT.f32 after one warm-up
 * compute, then prints "best_s median_s" over ITERS computes of the same graph. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-cpu.h"
#include "ggml.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void load(FILE *f, struct ggml_tensor *t) {
    if (fread(t->data, 1, ggml_nbytes(t), f) != ggml_nbytes(t)) {
        fprintf(stderr, "short read for %s\n", t->name);
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: %s WEIGHTS.f32 D F E K T ITERS THREADS OUT.f32\n", argv[0]);
        return 2;
    }
    const int D = atoi(argv[2]), F = atoi(argv[3]), E = atoi(argv[4]), K = atoi(argv[5]), T = atoi(argv[6]);
    const int iters = atoi(argv[7]), threads = atoi(argv[8]);
    size_t weights = (size_t)E * D + 3 * (size_t)E * F * D + (size_t)T * D;
    size_t work = (size_t)T * K * (3 * F + 2 * D) + (size_t)T * E * 4;
    struct ggml_init_params params = {(weights + work) * sizeof(float) + 64 * 1024 * 1024, NULL, false};
    ggml_cpu_init();
    struct ggml_context *ctx = ggml_init(params);
    struct ggml_tensor *gate_inp = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, D, E);
    struct ggml_tensor *up_exps = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, F, E);
    struct ggml_tensor *gate_exps = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, F, E);
    struct ggml_tensor *down_exps = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, F, D, E);
    struct ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, D, T);
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 1;
    }
    load(f, gate_inp), load(f, up_exps), load(f, gate_exps), load(f, down_exps), load(f, x);
    fclose(f);

    // 1. routing: softmax over experts, top-K, the K weights renormalised to sum 1
    struct ggml_tensor *probs = ggml_soft_max(ctx, ggml_mul_mat(ctx, gate_inp, x));          // [E, T]
    struct ggml_tensor *sel = ggml_argsort_top_k(ctx, probs, K);                               // [K, T]
    struct ggml_tensor *w = ggml_get_rows(ctx, ggml_reshape_3d(ctx, probs, 1, E, T), sel);   // [1, K, T]
    w = ggml_reshape_2d(ctx, w, K, T);
    w = ggml_div(ctx, w, ggml_clamp(ctx, ggml_sum_rows(ctx, w), 6.103515625e-5f, INFINITY));
    w = ggml_reshape_3d(ctx, w, 1, K, T);
    // 2. experts: each token through its K experts
    struct ggml_tensor *cur = ggml_reshape_3d(ctx, x, D, 1, T);
    struct ggml_tensor *up = ggml_mul_mat_id(ctx, up_exps, cur, sel);                          // [F, K, T]
    struct ggml_tensor *gate = ggml_mul_mat_id(ctx, gate_exps, cur, sel);                      // [F, K, T]
    struct ggml_tensor *y = ggml_mul_mat_id(ctx, down_exps, ggml_swiglu_split(ctx, gate, up), sel);  // [D, K, T]
    y = ggml_mul(ctx, y, w);
    // 3. combine: the K slots summed
    struct ggml_tensor *out = ggml_view_2d(ctx, y, D, T, y->nb[2], 0);
    for (int k = 1; k < K; k++) {
        out = ggml_add(ctx, out, ggml_view_2d(ctx, y, D, T, y->nb[2], k * y->nb[1]));
    }
    if (K == 1) {
        out = ggml_cont(ctx, out);  // a view otherwise
    }
    struct ggml_cgraph *gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);

    ggml_graph_compute_with_ctx(ctx, gf, threads);
    FILE *o = fopen(argv[9], "wb");
    fwrite(out->data, 1, ggml_nbytes(out), o);
    fclose(o);
    double *times = malloc(iters * sizeof(double));
    for (int i = 0; i < iters; i++) {
        double t0 = now();
        ggml_graph_compute_with_ctx(ctx, gf, threads);
        times[i] = now() - t0;
    }
    qsort(times, iters, sizeof(double), cmp);
    printf("%.9f %.9f\n", times[0], times[iters / 2]);
    ggml_free(ctx);
    return 0;
}
