"""llama.cpp's side of :mod:`benchmarks.peers.llamacpp_bench`, run by the peer's own Python (``~/peers/llamacpp``).

    <llamacpp-python> llamacpp_worker.py MODEL.gguf

Loads the GGUF once (llama-cpp-python's C API, no Python wrapper class) and prints ``RESULT {"ready": true}``.
Then each stdin line is a JSON job ``{"prompts": [[ids]], "max_tokens": T, "threads": N, "kv_unified": false}``:
a fresh context (``N`` threads for prefill and decode, f32 KV cache like ours, one sequence slot per prompt with
room for its prompt and output; the KV cache split per sequence, llama.cpp's default, or one unified pool, where
each sequence's attention spans every cell, masked), greedy decoding of ``T`` tokens for every prompt, and one
``RESULT {json}`` line: ``first_s`` (prefill and the first token of every sequence), ``seconds`` (the whole
job), CPU seconds of this process, the tokens.
Prefill goes ``n_batch`` (512) tokens per ``llama_decode``, logits only at each prompt's last position; each
decode step is one batch of one token per sequence. Greedy: argmax of the logits (numpy), like ours at
temperature 0. Context creation is outside the timings (ours reuses one engine). Imports nothing of ours.
"""

import json
import sys
import time

import llama_cpp as L
import numpy as np

N_BATCH = 512


class Batch:
    """A ``llama_batch`` of up to ``capacity`` tokens, one sequence id each."""

    def __init__(self, capacity: int) -> None:
        self.raw = L.llama_batch_init(capacity, 0, 1)

    def fill(self, tokens, positions, seqs, outputs) -> None:
        b = self.raw
        b.n_tokens = len(tokens)
        for i, (tok, pos, seq, out) in enumerate(zip(tokens, positions, seqs, outputs, strict=True)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq

    def free(self) -> None:
        L.llama_batch_free(self.raw)


def new_context(model, n_seqs: int, seq_tokens: int, threads: int, unified: bool):
    params = L.llama_context_default_params()
    params.n_ctx = n_seqs * -(-seq_tokens // 256) * 256  # split KV: each sequence gets n_ctx / n_seqs
    params.n_batch = params.n_ubatch = N_BATCH
    params.n_seq_max = n_seqs
    params.n_threads = params.n_threads_batch = threads
    params.type_k = params.type_v = L.GGML_TYPE_F32
    params.kv_unified = unified
    params.no_perf = True
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"llama_init_from_model failed (n_ctx {params.n_ctx}, n_seq_max {n_seqs})")
    return ctx


def argmax_rows(ctx, rows: int, n_vocab: int) -> list[int]:
    logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(rows * n_vocab,))
    return logits.reshape(rows, n_vocab).argmax(axis=1).tolist()


def decode(ctx, batch: Batch, tokens, positions, seqs, outputs) -> None:
    batch.fill(tokens, positions, seqs, outputs)
    rc = L.llama_decode(ctx, batch.raw)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc} ({len(tokens)} tokens)")


def generate(ctx, prompts: list[list[int]], max_tokens: int, n_vocab: int) -> tuple[list[list[int]], float]:
    """Greedy tokens per prompt, and the seconds until every sequence had its first one."""
    t0 = time.perf_counter()
    batch = Batch(max(N_BATCH, len(prompts)))
    try:
        # 1. prefill: all prompts packed N_BATCH tokens per call; logits at each prompt's last token only
        flat = [(tok, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, tok in enumerate(p)]
        out: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(flat), N_BATCH):
            chunk = flat[start:start + N_BATCH]
            decode(ctx, batch, *zip(*chunk, strict=True))
            last = [seq for _, _, seq, is_last in chunk if is_last]
            for seq, tok in zip(last, argmax_rows(ctx, len(last), n_vocab), strict=True):
                out[seq].append(tok)
        first_s = time.perf_counter() - t0
        # 2. decode: one token per sequence per step
        seqs = list(range(len(prompts)))
        for _ in range(max_tokens - 1):
            positions = [len(p) + len(o) - 1 for p, o in zip(prompts, out, strict=True)]
            decode(ctx, batch, [o[-1] for o in out], positions, seqs, [True] * len(seqs))
            for o, tok in zip(out, argmax_rows(ctx, len(seqs), n_vocab), strict=True):
                o.append(tok)
    finally:
        batch.free()
    return out, first_s


def main() -> None:
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = L.llama_model_load_from_file(sys.argv[1].encode(), mparams)
    if not model:
        raise RuntimeError(f"could not load {sys.argv[1]}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    print("RESULT " + json.dumps({"ready": True, "n_vocab": n_vocab, "system": L.llama_print_system_info().decode()}),
          flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        job = json.loads(line)
        prompts, max_tokens = job["prompts"], job["max_tokens"]
        ctx = new_context(model, len(prompts), max(map(len, prompts)) + max_tokens, job["threads"],
                          job.get("kv_unified", False))
        try:
            generate(ctx, [prompts[0][:8]], 2, n_vocab)  # warm-up: first-call allocations and thread start
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            cpu0, t0 = time.process_time(), time.perf_counter()
            tokens, first_s = generate(ctx, prompts, max_tokens, n_vocab)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            L.llama_free(ctx)
        print("RESULT " + json.dumps({"first_s": first_s, "seconds": seconds, "cpu_s": cpu, "tokens": tokens}),
              flush=True)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
