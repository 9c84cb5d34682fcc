// A thread of its own for decode_step: decode_worker_launch hands it a step and returns at once, decode_worker_wait
// blocks until the step is done and returns its compute seconds. The caller (the engine thread, holding Python's
// GIL) plans the next step meanwhile: the worker never needs the GIL, so it starts within a thread wake-up, where
// a Python thread would wait for the interpreter's switch interval. One step at a time per worker; the caller
// keeps every buffer of a launched step alive until it has waited.
//
// Waking a sleeping thread on another core costs 50-250 us on these virtual machines, a tenth of a decode step, on
// each side: so the worker spins a little after a step before it sleeps (the engine launches the next one within
// ~50 us of the last one's end), and the waiting engine sleeps until shortly before the step should end (by the
// last step's time) and spins from there, a bounded while, before it sleeps on the step's end.
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#define SPIN_BEFORE_SLEEP_S 300e-6  // the worker, after a step
#define WAKE_EARLY 0.8              // the waiting engine wakes after this share of the last step's time
#define SPIN_WAIT_S 1e-3            // and spins at most this long

typedef struct {
    const int64_t *shape;
    float eps;
    const float *const *layers;
    const int64_t *ffn;
    const float *embed, *final_norm, *lm_head, *cos_table, *sin_table;
    float *kv_pool;
    long B;
    const int64_t *ids, *positions, *slots, *tables, *lens;
    long S;
    const int64_t *sample_rows;
    float *logits_out;
    int32_t *route_ids;
    float *route_weights, *route_logits;
    int nt;
    const int64_t *prev_tokens;
    int64_t *argmax_out;
} decode_args;

typedef struct {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int queued, done, stop;
    double seconds, launched_at, last_seconds;
    decode_args a;
} decode_worker;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void *decode_worker_loop(void *arg) {
    decode_worker *w = arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        if (!w->queued && !w->stop) {  // spin a little without the lock, then sleep
            pthread_mutex_unlock(&w->mu);
            const double until = now_s() + SPIN_BEFORE_SLEEP_S;
            while (!__atomic_load_n(&w->queued, __ATOMIC_ACQUIRE) && now_s() < until) _mm_pause();
            pthread_mutex_lock(&w->mu);
        }
        while (!w->queued && !w->stop) pthread_cond_wait(&w->cv, &w->mu);
        if (w->stop) break;
        w->queued = 0;
        decode_args a = w->a;
        pthread_mutex_unlock(&w->mu);
        double start = now_s();
        decode_step(a.shape, a.eps, a.layers, a.ffn, a.embed, a.final_norm, a.lm_head, a.cos_table, a.sin_table,
                    a.kv_pool, a.B, a.ids, a.positions, a.slots, a.tables, a.lens, a.S, a.sample_rows, a.logits_out,
                    a.route_ids, a.route_weights, a.route_logits, a.nt, a.prev_tokens, a.argmax_out);
        double seconds = now_s() - start;
        pthread_mutex_lock(&w->mu);
        w->seconds = seconds;
        __atomic_store_n(&w->done, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&w->cv);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

void *decode_worker_new(void) {
    decode_worker *w = calloc(1, sizeof(decode_worker));
    if (w == NULL) return NULL;
    pthread_condattr_t monotonic;
    pthread_condattr_init(&monotonic);
    pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC);  // the clock of now_s(), for the timed wait
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, &monotonic);
    pthread_condattr_destroy(&monotonic);
    if (pthread_create(&w->thread, NULL, decode_worker_loop, w) != 0) {
        free(w);
        return NULL;
    }
    return w;
}

void decode_worker_launch(decode_worker *w, const int64_t *shape, float eps, const float *const *layers,
                          const int64_t *ffn, const float *embed, const float *final_norm, const float *lm_head,
                          const float *cos_table, const float *sin_table, float *kv_pool, long B, const int64_t *ids,
                          const int64_t *positions, const int64_t *slots, const int64_t *tables, const int64_t *lens,
                          long S, const int64_t *sample_rows, float *logits_out, int32_t *route_ids,
                          float *route_weights, float *route_logits, int nt, const int64_t *prev_tokens,
                          int64_t *argmax_out) {
    decode_args a = {shape, eps, layers, ffn, embed, final_norm, lm_head, cos_table, sin_table, kv_pool, B, ids,
                     positions, slots, tables, lens, S, sample_rows, logits_out, route_ids, route_weights,
                     route_logits, nt, prev_tokens, argmax_out};
    pthread_mutex_lock(&w->mu);
    w->a = a;
    w->launched_at = now_s();
    __atomic_store_n(&w->done, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&w->queued, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

double decode_worker_wait(decode_worker *w) {
    pthread_mutex_lock(&w->mu);
    const double wake_at = w->launched_at + WAKE_EARLY * w->last_seconds;
    while (!w->done && now_s() < wake_at) {  // asleep until shortly before the step should end
        struct timespec t = {(time_t)wake_at, (long)((wake_at - (double)(time_t)wake_at) * 1e9)};
        pthread_cond_timedwait(&w->cv, &w->mu, &t);
    }
    if (!w->done) {  // then spin, a bounded while
        pthread_mutex_unlock(&w->mu);
        const double until = now_s() + SPIN_WAIT_S;
        while (!__atomic_load_n(&w->done, __ATOMIC_ACQUIRE) && now_s() < until) _mm_pause();
        pthread_mutex_lock(&w->mu);
    }
    while (!w->done) pthread_cond_wait(&w->cv, &w->mu);
    const double seconds = w->seconds;
    w->last_seconds = seconds;
    pthread_mutex_unlock(&w->mu);
    return seconds;
}

void decode_worker_free(decode_worker *w) {
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    free(w);
}
