"""vLLM's side of :mod:`benchmarks.peers.vllm_offline`, run by the peer's own Python (``~/peers/vllm``).

    <vllm-python> vllm_worker.py REQUESTS.json MODEL_DIR MAX_NUM_SEQS MEMORY_FRACTION

Loads the model once, then on every ``run`` line of stdin generates the requests (greedy, EOS ignored, the
prefix cache reset first, as our side builds a fresh engine) and prints one ``RESULT {json}`` line: wall
seconds of the generate call, CPU seconds of this process and its children (vLLM's engine core) over it, and
the output token ids. ``MEMORY_FRACTION``: vLLM's ``gpu_memory_utilization``, which on its CPU backend is
the share of the NUMA node's memory it reserves (its 0.92 default fails where other processes hold memory).
This file imports nothing of ours.
"""

import json
import sys
import time

import psutil
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def cpu_seconds() -> float:
    procs = [psutil.Process()]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> None:
    requests_path, model, max_num_seqs, memory = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    requests = json.load(open(requests_path))
    llm = LLM(model=model, dtype="float32", max_num_seqs=max_num_seqs, seed=0, gpu_memory_utilization=memory)
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in requests]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in requests]
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(max_tokens=4), use_tqdm=False)
    print("RESULT " + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        llm.reset_prefix_cache()
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        print("RESULT " + json.dumps({"seconds": seconds, "cpu_s": cpu, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
