"""Teacher fan-out throughput against `ftcot teacher-sim` with a fixed latency (default 100 ms).

    python benchmarks/teacher_fanout.py                    # 2,000 requests at 16, 64, 256 in flight; 200 at 1
    python benchmarks/teacher_fanout.py --requests 400     # a smoke run

Each "request" is one HTTP call; a row is two (the paper's step 1 and step 2), so 2,000 requests are
1,000 rows. Measured side by side in one run, against the same sim process (replay mode, its own
process), at each level of requests in flight:

* ours: the teach stage (`ftcot_ray.stages.teach.run`: the Ray Data fan-out over an actor pool of
  async workers, the answer store, the gate actor, the Parquet shards) in three figures: wall time
  including `ray.init` (a fresh local Ray per level, what a user waits for), wall time after
  `ray.init` (the Ray Data part, actor start-up included), and steady state (first to last request
  as the sim saw them: what a long run gets);
* the ideal: in flight / latency;
* the aiohttp ceiling: a bare asyncio loop over one pooled aiohttp session, no Ray, no cache: what
  one process on this machine can send (the client of choice since issue 14);
* the raw SDK loop: the same loop with `openai.AsyncOpenAI` (what the fan-out used before).

The machine is shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ftcot_ray.config import TeacherSimConfig  # noqa: E402
from ftcot_ray.io import write_jsonl  # noqa: E402
from ftcot_ray.prompts import answer_prompt, reasoning_prompt  # noqa: E402
from ftcot_ray.teacher.sim import running_sim  # noqa: E402

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


class FirstRequest:
    """Watches the sim's counters from a thread: when the first request of a measurement arrived."""

    def __init__(self, base_url: str):
        import httpx

        self.url = base_url.rsplit("/v1", 1)[0] + "/stats"
        self.get = lambda: httpx.get(self.url, timeout=5).json()
        self.base = self.get()["total_requests"]
        self.at = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.01) and self.at is None:
            if self.get()["total_requests"] > self.base:
                self.at = time.time()

    def last_answer(self) -> float:
        s = self.get()
        return time.time() - (s["seconds_since_last_answer"] or 0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)


def ours(base_url: str, rows: list[dict], concurrency: int, tmp: Path) -> dict:
    """The teach stage on `rows` (a data-stage folder written here), from a fresh local Ray."""
    import ray

    from ftcot_ray.artifacts import finish, stage_dir
    from ftcot_ray.config import load_config
    from ftcot_ray.stages import teach
    from ftcot_ray.tables import write_table

    run = tmp / f"run-{concurrency}-{time.time_ns()}"
    cfg = load_config("quickstart", {"run_dir": str(run), "data.dataset": "bench", "data.answer_format": "number_exact",
                                     "teacher.base_url": base_url, "teacher.model": MODEL, "teacher.samples": 1,
                                     "teacher.concurrency": concurrency, "teacher.timeout_s": 60,
                                     "pipeline.diversity": [1], "resources.num_cpus": 4})
    folder = stage_dir(cfg, "data")
    finish(folder, cfg, "data", tables={"problems": write_table(folder, "problems", [r | {"dataset": "bench"} for r in rows])})
    watch = FirstRequest(base_url)
    t0 = time.time()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2)
    t_ray = time.time() - t0
    summary = teach.run(cfg, progress=False)
    wall = time.time() - t0
    last = watch.last_answer()
    watch.close()
    ray.shutdown()
    steady = summary["requests"] / max(1e-9, last - (watch.at or t0))
    return {"requests": summary["requests"], "wall_s": wall, "ray_init_s": t_ray, "rps": summary["requests"] / wall,
            "rps_after_init": summary["requests"] / (wall - t_ray), "rps_steady": steady,
            "first_request_after_init_s": (watch.at or t0) - t0 - t_ray, "errors": summary["errors"],
            "rows": summary["rows"], "plan": summary.get("fan_out")}


def loop(base_url: str, rows: list[dict], concurrency: int, client: str) -> dict:
    """The two steps of every row from one asyncio loop, `concurrency` requests in flight."""
    async def main() -> int:
        sem = asyncio.Semaphore(concurrency)
        if client == "aiohttp":
            import aiohttp

            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                            headers={"Authorization": "Bearer x"})

            async def complete(prompt: str, max_tokens: int) -> str:
                body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "seed": 0}
                async with session.post(f"{base_url}/completions", data=json.dumps(body),
                                        headers={"Content-Type": "application/json"}) as resp:
                    return json.loads(await resp.read())["choices"][0]["text"]

            close = session.close
        else:
            import httpx
            import openai

            http = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 8,
                                                         max_keepalive_connections=concurrency + 8))
            sdk = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, http_client=http)

            async def complete(prompt: str, max_tokens: int) -> str:
                r = await sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, seed=0)
                return r.choices[0].text

            close = sdk.close

        async def one(r: dict) -> int:
            async with sem:
                rationale = await complete(reasoning_prompt(r["question"]), 128)
            async with sem:
                await complete(answer_prompt(r["question"], rationale), 32)
            return 2

        n = sum(await asyncio.gather(*(one(r) for r in rows)))
        await close()
        return n

    t0, c0 = time.time(), time.process_time()
    n = asyncio.run(main())
    wall, cpu = time.time() - t0, time.process_time() - c0
    return {"requests": n, "wall_s": wall, "rps": n / wall, "cpu_ms_per_request": 1000 * cpu / n}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="HTTP requests per measurement (2 per row)")
    p.add_argument("--c1-requests", type=int, default=200, help="requests at 1 in flight (100 ms each)")
    p.add_argument("--latency-ms", type=float, default=100.0)
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--sdk-at", default="16,64,256", help="levels at which to run the raw openai SDK loop")
    args = p.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x]
    sdk_levels = {int(x) for x in args.sdk_at.split(",") if x}
    all_rows = bench_rows(args.requests // 2)
    lat = args.latency_ms / 1000
    print(f"teacher fan-out benchmark: {args.requests} requests ({len(all_rows)} rows x 2 steps; "
          f"{args.c1_requests} at c=1), sim latency {args.latency_ms:g} ms; CPU, {os.cpu_count()} cores shared with "
          f"the sim and other work, load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict = {"ours": {}, "aiohttp": {}, "sdk": {}, "load_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        settings = TeacherSimConfig(mode="replay", replay_path=str(replay_file(all_rows, tmp / "replay.jsonl")),
                                    latency_ms=args.latency_ms)
        with running_sim(settings, subprocess_mode=True) as base_url:
            for c in levels:
                rows = all_rows if c > 1 else all_rows[: args.c1_requests // 2]
                o = results["ours"][c] = ours(base_url, rows, c, tmp)
                print(f"  ours     c={c:<4} {o['rps']:8.1f} req/s incl. ray.init ({o['ray_init_s']:.1f} s), "
                      f"{o['rps_after_init']:8.1f} after it, {o['rps_steady']:8.1f} steady "
                      f"(first request {o['first_request_after_init_s']:.1f} s after ray.init; errors {o['errors']})",
                      flush=True)
                a = results["aiohttp"][c] = loop(base_url, rows, c, "aiohttp")
                print(f"  aiohttp  c={c:<4} {a['rps']:8.1f} req/s ({a['cpu_ms_per_request']:.2f} ms CPU/request)", flush=True)
                if c in sdk_levels:
                    s = results["sdk"][c] = loop(base_url, rows, c, "sdk")
                    print(f"  sdk      c={c:<4} {s['rps']:8.1f} req/s ({s['cpu_ms_per_request']:.2f} ms CPU/request)",
                          flush=True)
    results["load_end"] = os.getloadavg()
    print()
    print("| in flight | ideal req/s | aiohttp ceiling | raw SDK loop | ours incl. Ray start | ours after ray.init "
          "| ours steady | ours/aiohttp (incl. / after / steady) | ours/SDK (after) | ours/ideal (after / steady) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in levels:
        o, a = results["ours"][c], results["aiohttp"][c]["rps"]
        s = results["sdk"].get(c, {}).get("rps")
        ideal = c / lat
        print(f"| {c} | {ideal:.0f} | {a:.1f} | {f'{s:.1f}' if s else '-'} | {o['rps']:.1f} | {o['rps_after_init']:.1f} "
              f"| {o['rps_steady']:.1f} | {o['rps'] / a:.2f} / {o['rps_after_init'] / a:.2f} / {o['rps_steady'] / a:.2f} "
              f"| {format(o['rps_after_init'] / s, '.1f') + 'x' if s else '-'} "
              f"| {o['rps_after_init'] / ideal:.2f} / {o['rps_steady'] / ideal:.2f} |")
    print(f"\nload average {results['load_start'][0]:.2f} at the start, {results['load_end'][0]:.2f} at the end")
    print(json.dumps({"benchmark": "teacher_fanout", "requests": args.requests, "latency_ms": args.latency_ms,
                      "results": results}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
