"""Online serving load: Poisson arrivals against the OpenAI-compatible server, like ``vllm bench serve``.

    python -m benchmarks.serve_load [--url http://127.0.0.1:8000] [--requests 64] [--request-rate 4]
                                    [--max-concurrency 32] [--input-len 16:512] [--output-len 8:256]

Without ``--url`` it starts ``moe-serve`` on a free loopback port (the embedded default model, one intra-op
thread) and stops it afterwards. Requests stream with ``ignore_eos`` so each produces exactly its output
length; prompts are token-id windows of standard-library source (fixed seed). Reports request and token
throughput and TTFT / TPOT / ITL / E2E mean, p50 and p99, plus, in the same run, the offline engine's
throughput on the same requests (all submitted at once): the server's ratio to it is the price of HTTP,
SSE and arrival gaps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx

from benchmarks.server import running_server


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def make_requests(n: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int):
    import inspect

    from serve.engine.config import DEFAULT_MODEL
    from serve.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(DEFAULT_MODEL)
    corpus = tokenizer.encode(inspect.getsource(argparse) + inspect.getsource(random))
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, o = rng.randint(*input_len), rng.randint(*output_len)
        start = rng.randrange(0, len(corpus) - p)
        out.append((corpus[start:start + p], o))
    return out


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int,
                      model: str | None = None) -> Result:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    result, start = Result(), time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk["choices"]:
                    continue
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.e2e, result.ok = time.perf_counter() - start, True
    except httpx.HTTPError as e:
        result.error = repr(e)
    return result


async def run_load(url: str, requests, rate: float, max_concurrency: int, seed: int, model: str | None = None):
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency)

    async def limited(client, prompt, out):
        async with limit:
            return await one_request(client, url, prompt, out, model)

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=max_concurrency)) as client:
        tasks = []
        start = time.perf_counter()
        for prompt, out in requests:
            tasks.append(asyncio.create_task(limited(client, prompt, out)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    values = sorted(values)
    p = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return f"mean {statistics.fmean(values) * 1e3:8.1f}  p50 {p(0.5) * 1e3:8.1f}  p99 {p(0.99) * 1e3:8.1f} ms"


def offline_throughput(requests) -> float:
    import torch

    from serve import LLM, SamplingParams

    torch.set_num_threads(1)
    llm = LLM()
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in requests]
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params)
    return sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=4.0, help="requests/s (Poisson); inf = all at once")
    ap.add_argument("--max-concurrency", type=int, default=32)
    ap.add_argument("--input-len", default="16:512")
    ap.add_argument("--output-len", default="8:256")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-offline", action="store_true", help="skip the offline-engine comparison")
    args = ap.parse_args()
    span = lambda s: tuple(int(x) for x in s.split(":"))  # noqa: E731
    requests = make_requests(args.requests, span(args.input_len), span(args.output_len), args.seed)

    if args.url:
        results, elapsed = asyncio.run(run_load(args.url, requests, args.request_rate, args.max_concurrency,
                                                args.seed))
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with running_server("server.log_level=warning") as server:
            asyncio.run(run_load(server.url, requests[:2], float("inf"), 2, args.seed))  # warm-up
            results, elapsed = asyncio.run(run_load(server.url, requests, args.request_rate, args.max_concurrency,
                                                    args.seed))
            server.wait_idle()

    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(len(p) for (p, _), r in zip(requests, results, strict=True) if r.ok)
    print(f"requests: {len(ok)}/{len(results)} ok, rate {args.request_rate}/s, max concurrency "
          f"{args.max_concurrency}, duration {elapsed:.1f} s")
    for r in results:
        if not r.ok:
            print("  failed:", r.error)
    print(f"request throughput  {len(ok) / elapsed:8.2f} req/s")
    print(f"output throughput   {tokens / elapsed:8.1f} tok/s   total (prompt+output) "
          f"{(tokens + prompt_tokens) / elapsed:8.1f} tok/s")
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    print(f"TTFT  {percentiles([r.ttft for r in ok])}")
    print(f"TPOT  {percentiles(tpot)}")
    print(f"ITL   {percentiles([x for r in ok for x in r.itl])}")
    print(f"E2E   {percentiles([r.e2e for r in ok])}")
    if not args.no_offline and not args.url:
        offline = offline_throughput(requests)
        print(f"offline engine, same requests at once: {offline:8.1f} tok/s -> server/offline "
              f"{tokens / elapsed / offline:.2f}x (arrival gaps and HTTP/SSE included)")


if __name__ == "__main__":
    main()
