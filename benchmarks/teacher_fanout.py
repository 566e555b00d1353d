"""Teacher fan-out throughput against `ftcot teacher-sim` with a fixed latency (default 100 ms).

    python benchmarks/teacher_fanout.py                    # 2,000 requests at concurrency 1, 16, 64, 256
    python benchmarks/teacher_fanout.py --requests 400     # a smoke run

Each "request" is one HTTP call; a row is two (the paper's step 1 and step 2), so 2,000 requests are
1,000 rows. Measured side by side in one run, against the same sim process (replay mode, its own
process so it has a core of its own):

* ours: `ftcot_ray.teacher.fanout.fan_out` (Ray Data, async actor, cache writes, gate actor), wall
  time INCLUDING `ray.init` (a fresh local Ray per level, shut down after);
* the ideal: concurrency / latency;
* raw: a bare asyncio loop of AsyncOpenAI calls with a semaphore, no Ray, no cache (this machine's ceiling);
* Ray's own `ray.data.llm` HTTP processor (`build_processor` + `HttpRequestProcessorConfig`);
* a sequential client (sync OpenAI, one call after another).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ftcot_ray.config import TeacherConfig  # noqa: E402
from ftcot_ray.io import write_jsonl  # noqa: E402
from ftcot_ray.prompts import answer_prompt, reasoning_prompt  # noqa: E402
from ftcot_ray.teacher.sim import SimSettings, running_sim  # noqa: E402

MODEL = "ftcot-sim-teacher"


def bench_rows(n: int) -> list[dict]:
    return [{"sample_index": i, "sample_idx": 0, "split": "train", "answer": str(i + 1),
             "question": f"Benchmark question {i}: what is {i} plus 1?"} for i in range(n)]


def replay_file(rows: list[dict], path: Path) -> Path:
    """A recorded-completions table for the sim to replay (the benchmark needs no synthetic task)."""
    recs = []
    for r in rows:
        rationale = f" We add 1 to {r['sample_index']}. That makes {r['sample_index'] + 1}."
        recs.append({"sample_index": r["sample_index"], "sample_idx": 0, "reasoning_prompt": reasoning_prompt(r["question"]),
                     "rationale": rationale, "finish_reason": "stop", "answer_completion": f" {r['answer']}.", "error": None})
    write_jsonl(path, recs)
    return path


def ours(base_url: str, endpoint_id: str, rows: list[dict], concurrency: int, tmp: Path) -> dict:
    import ray

    from ftcot_ray.teacher.client import Secret
    from ftcot_ray.teacher.fanout import fan_out

    tcfg = TeacherConfig(model=MODEL, concurrency=concurrency, timeout_s=60)
    t0 = time.time()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
    t_ray = time.time() - t0
    out, stats = fan_out(rows, tcfg, base_url=base_url, endpoint_id=endpoint_id, secret=Secret("x"),
                         cache_dir=str(tmp / f"cache-{concurrency}-{time.time_ns()}"), progress=False)
    wall = time.time() - t0
    ray.shutdown()
    errors = sum(1 for r in out if r["error"])
    return {"requests": stats["requests"], "wall_s": wall, "ray_init_s": t_ray, "rps": stats["requests"] / wall,
            "rps_after_init": stats["requests"] / (wall - t_ray), "errors": errors, "rows": len(out)}


def raw(base_url: str, rows: list[dict], concurrency: int) -> dict:
    import httpx
    import openai

    async def main() -> int:
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 8,
                                                     max_keepalive_connections=concurrency + 8))
        client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, http_client=http)
        sem = asyncio.Semaphore(concurrency)

        async def one(r: dict) -> int:
            async with sem:
                a = await client.completions.create(model=MODEL, prompt=reasoning_prompt(r["question"]), max_tokens=128,
                                                    temperature=0, seed=0)
            async with sem:
                await client.completions.create(model=MODEL, prompt=answer_prompt(r["question"], a.choices[0].text),
                                                max_tokens=32, temperature=0, seed=0)
            return 2

        n = sum(await asyncio.gather(*(one(r) for r in rows)))
        await client.close()
        return n

    t0 = time.time()
    n = asyncio.run(main())
    wall = time.time() - t0
    return {"requests": n, "wall_s": wall, "rps": n / wall}


def sequential(base_url: str, rows: list[dict]) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    t0 = time.time()
    for r in rows:
        a = client.completions.create(model=MODEL, prompt=reasoning_prompt(r["question"]), max_tokens=128, temperature=0, seed=0)
        client.completions.create(model=MODEL, prompt=answer_prompt(r["question"], a.choices[0].text), max_tokens=32,
                                  temperature=0, seed=0)
    wall = time.time() - t0
    return {"requests": 2 * len(rows), "wall_s": wall, "rps": 2 * len(rows) / wall}


def ray_processor(base_url: str, rows: list[dict], qps: int) -> dict:
    """Ray's ray.data.llm HTTP processor on the same step-1 requests (it has no notion of a 2-step chain)."""
    import ray
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    t0 = time.time()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = HttpRequestProcessorConfig(url=f"{base_url}/completions", headers={"Authorization": "Bearer x"},
                                        qps=qps, batch_size=64, concurrency=1)
    processor = build_processor(config, preprocess=lambda row: {"payload": {
        "model": MODEL, "prompt": row["prompt"], "max_tokens": 128, "temperature": 0, "seed": 0}},
        postprocess=lambda row: {"ok": "choices" in row["http_response"]})
    ds = ray.data.from_items([{"prompt": reasoning_prompt(r["question"])} for r in rows])
    ok = sum(1 for r in processor(ds).take_all() if r["ok"])
    wall = time.time() - t0
    ray.shutdown()
    return {"requests": len(rows), "ok": ok, "wall_s": wall, "rps": len(rows) / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="HTTP requests per measurement (2 per row)")
    p.add_argument("--latency-ms", type=float, default=100.0)
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--raw-at", default="16,64,256", help="levels at which to run the raw asyncio loop")
    p.add_argument("--seq-requests", type=int, default=200)
    p.add_argument("--ray-processor-requests", type=int, default=400)
    p.add_argument("--ray-processor-qps", type=int, default=640, help="its qps knob (None would be sequential)")
    args = p.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x]
    raw_levels = {int(x) for x in args.raw_at.split(",") if x}
    rows = bench_rows(args.requests // 2)
    lat = args.latency_ms / 1000
    print(f"teacher fan-out benchmark: {args.requests} requests ({len(rows)} rows x 2 steps), "
          f"sim latency {args.latency_ms:g} ms; CPU, {os.cpu_count()} cores (shared with the sim)", flush=True)
    results: dict = {"ours": {}, "raw": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        settings = SimSettings(mode="replay", replay_path=str(replay_file(rows, tmp / "replay.jsonl")),
                               latency_ms=args.latency_ms)
        with running_sim(settings, subprocess_mode=True) as base_url:
            for c in levels:
                results["ours"][c] = ours(base_url, settings.endpoint_id(), rows, c, tmp)
                print(f"  ours   c={c:<4} {results['ours'][c]['rps']:8.1f} req/s  ({results['ours'][c]['wall_s']:.1f} s "
                      f"incl. ray.init {results['ours'][c]['ray_init_s']:.1f} s, errors {results['ours'][c]['errors']})", flush=True)
                if c in raw_levels:
                    results["raw"][c] = raw(base_url, rows, c)
                    print(f"  raw    c={c:<4} {results['raw'][c]['rps']:8.1f} req/s", flush=True)
            results["sequential"] = sequential(base_url, rows[: args.seq_requests // 2])
            print(f"  sequential    {results['sequential']['rps']:8.1f} req/s", flush=True)
            results["ray_processor"] = ray_processor(base_url, rows[: args.ray_processor_requests], args.ray_processor_qps)
            print(f"  ray.data.llm  {results['ray_processor']['rps']:8.1f} req/s (qps={args.ray_processor_qps}, "
                  f"{results['ray_processor']['ok']}/{results['ray_processor']['requests']} ok, incl. ray.init)", flush=True)
    rp = results["ray_processor"]["rps"]
    print()
    # Both figures: the issue asks for Ray start-up inside the wall time (what a user waits for); the
    # second column leaves out `ray.init` (a job on a running cluster pays none).
    print("| concurrency | ours req/s (incl. Ray start) | ours req/s (after ray.init) | ideal c/latency | ours/ideal "
          "(incl. / after) | raw asyncio req/s | ours/raw (incl. / after) | ours/ray.data.llm (incl.) |")
    print("|---|---|---|---|---|---|---|---|")
    for c in levels:
        o, o2 = results["ours"][c]["rps"], results["ours"][c]["rps_after_init"]
        ideal = c / lat
        r = results["raw"].get(c, {}).get("rps")
        print(f"| {c} | {o:.1f} | {o2:.1f} | {ideal:.0f} | {o / ideal:.2f} / {o2 / ideal:.2f} | {f'{r:.1f}' if r else '-'} | "
              f"{f'{o / r:.2f} / {o2 / r:.2f}' if r else '-'} | {o / rp:.1f}x |")
    print(f"\nsequential client: {results['sequential']['rps']:.1f} req/s; ray.data.llm HTTP processor: {rp:.1f} req/s")
    print(json.dumps({"benchmark": "teacher_fanout", "requests": args.requests, "latency_ms": args.latency_ms,
                      "results": results}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
