"""No request can stall the others (issue 19): small requests' TTFT next to one large request, the server's RSS
around the burst, and ``/health`` and an unrelated stream while a 16 MB body is parsed.

    python -m benchmarks.fairness [--small 32] [--concurrency 4] [--big-prompts 8] [--big-n 32] [--big-tokens 64]

Starts ``moe-serve`` (the embedded default model, one intra-op thread) on a free loopback port, then:

1. small streaming requests (16-token prompts, 8 tokens), ``--concurrency`` at a time: TTFT p50 / p99 unloaded;
2. the same with one large request in flight (``--big-prompts`` prompts x ``--big-n`` choices, ``--big-tokens``
   each: 256 sub-requests by default, the most ``server.max_sub_requests_per_request`` allows) and the ratio to
   (1) (target: p99 within 3x); the server's RSS before, at its peak during and after the burst (target: after
   within 20% of before);
3. a body just under ``server.max_request_bytes`` (a 16 MB prompt) sent while a stream runs: the slowest
   ``/health`` answer and the stream's largest gap between tokens meanwhile (targets: < 1 s each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time

import httpx
import psutil

from benchmarks.server import running_server

SMALL_PROMPT = list(range(100, 116))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def stream_tokens(client: httpx.AsyncClient, url: str, body: dict) -> list[float]:
    """Arrival times of a streaming completion's token chunks, relative to the request's start."""
    start, times = time.perf_counter(), []
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                times.append(time.perf_counter() - start)
    return times


async def small_ttfts(url: str, count: int, concurrency: int) -> list[float]:
    body = {"prompt": SMALL_PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> float:
            async with limit:
                return (await stream_tokens(client, url, {**body, "prompt": [i % 50, *SMALL_PROMPT]}))[0]

        return await asyncio.gather(*[one(i) for i in range(count)])


class RssSampler:
    """The peak RSS of ``pid`` while it runs (sampled every ``period_s``)."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        self.process, self.period_s, self.peak = psutil.Process(pid), period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.period_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def with_big_request(server, args) -> tuple[list[float], float, int]:
    """Small TTFTs while the large request runs; its duration and how many small ones finished before it."""
    big = {"prompt": [list(range(200 + 40 * i, 232 + 40 * i)) for i in range(args.big_prompts)], "n": args.big_n,
           "max_tokens": args.big_tokens, "temperature": 0.8, "seed": 1, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        big_task = asyncio.create_task(client.post(server.v1 + "/completions", json=big))
        while server.metric("vllm:num_requests_running") + server.metric("vllm:num_requests_waiting") \
                < args.big_prompts * args.big_n and not big_task.done():
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # the batch is full of the large request's sequences by now
        ttfts = await small_ttfts(server.url, args.small, args.concurrency)
        small_done = time.perf_counter() - start
        r = await big_task
        if r.status_code != 200:
            raise RuntimeError(f"large request: HTTP {r.status_code} {r.text[:300]}")
        big_s = time.perf_counter() - start
    return ttfts, big_s, small_done < big_s


def huge_bodies(max_bytes: int) -> dict[str, bytes]:
    """Bodies just under ``max_bytes``: one text prompt, one prompt of token ids."""
    text = "def f(x): return x; " * ((max_bytes - 1000) // 20)  # JSON escapes nothing in it: 1 byte a character
    ids = [7] * ((max_bytes - 1000) // 3)  # "7, " a token
    return {"text prompt": json.dumps({"prompt": text, "max_tokens": 1}).encode(),
            "token-id prompt": json.dumps({"prompt": ids, "max_tokens": 1}).encode()}


async def huge_body_in_flight(server, raw: bytes) -> dict:
    """A stream and ``/health`` polling while ``raw`` is uploaded and parsed."""
    async with httpx.AsyncClient(timeout=600) as client:
        stream = asyncio.create_task(stream_tokens(client, server.url, {
            "prompt": SMALL_PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}))
        await asyncio.sleep(0.5)
        health: list[float] = []
        done = asyncio.Event()

        async def poll() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                r = await client.get(server.url + "/health")
                health.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
                await asyncio.sleep(0.02)

        poller = asyncio.create_task(poll())
        t0 = time.perf_counter()
        r = await client.post(server.v1 + "/completions", content=raw, headers={"content-type": "application/json"})
        huge_s = time.perf_counter() - t0
        await asyncio.sleep(0.3)
        done.set()
        await poller
        times = await stream
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"bytes": len(raw), "status": r.status_code, "huge_s": huge_s, "health_max": max(health),
            "health_n": len(health), "gap_max": max(gaps), "gap_p50": statistics.median(gaps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=32, help="small requests per phase")
    ap.add_argument("--concurrency", type=int, default=4, help="small requests in flight at once")
    ap.add_argument("--big-prompts", type=int, default=8)
    ap.add_argument("--big-n", type=int, default=32)
    ap.add_argument("--big-tokens", type=int, default=64)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the server (engine.max_num_seqs=32, ...)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    max_bytes = 16 * 2**20
    with running_server("server.log_level=warning", *args.overrides) as server:
        process = psutil.Process(server.process.pid)
        asyncio.run(small_ttfts(server.url, 4, 2))  # warm-up
        unloaded = asyncio.run(small_ttfts(server.url, args.small, args.concurrency))
        rss_before = process.memory_info().rss
        with RssSampler(server.process.pid) as rss:
            loaded, big_s, overlapped = asyncio.run(with_big_request(server, args))
        server.wait_idle(60)
        time.sleep(1.0)
        rss_after = process.memory_info().rss
        huge = {name: asyncio.run(huge_body_in_flight(server, raw)) for name, raw in huge_bodies(max_bytes).items()}
        server.wait_idle(60)
        rss_end = process.memory_info().rss

    mb = lambda b: b / 2**20  # noqa: E731
    p50u, p99u, p50l, p99l = pct(unloaded, 0.5), pct(unloaded, 0.99), pct(loaded, 0.5), pct(loaded, 0.99)
    print(f"small requests ({args.small}, {args.concurrency} at a time), TTFT ms:")
    print(f"  unloaded            p50 {p50u * 1e3:7.1f}  p99 {p99u * 1e3:7.1f}")
    print(f"  with {args.big_prompts}x n={args.big_n} x {args.big_tokens} tokens in flight "
          f"p50 {p50l * 1e3:7.1f}  p99 {p99l * 1e3:7.1f}   (large request {big_s:.1f} s; small ones all done "
          f"before it: {overlapped})")
    print(f"  ratio loaded/unloaded  p50 {p50l / p50u:5.2f}x  p99 {p99l / p99u:5.2f}x   (target p99 < 3x)")
    print(f"server RSS MB: before {mb(rss_before):.0f}, peak during the burst {mb(rss.peak):.0f}, after "
          f"{mb(rss_after):.0f} ({rss_after / rss_before - 1:+.1%}; target within 20%), after the 16 MB bodies "
          f"{mb(rss_end):.0f}")
    for name, h in huge.items():
        print(f"{h['bytes'] / 1e6:.1f} MB body, {name} (HTTP {h['status']} in {h['huge_s'] * 1e3:.0f} ms): slowest "
              f"/health {h['health_max'] * 1e3:.0f} ms of {h['health_n']}; unrelated stream's largest token gap "
              f"{h['gap_max'] * 1e3:.0f} ms (median {h['gap_p50'] * 1e3:.0f} ms)   (targets < 1000 ms)")


if __name__ == "__main__":
    main()
