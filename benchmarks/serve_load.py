"""Serving throughput under load: `ftcot serve` (Ray Serve, dynamic batching) vs the same server with
batching off vs a plain single-process uvicorn + transformers server written the obvious way.

Closed-loop clients (each sends a request, waits for the answer, sends the next) against one tiny
student (a from-scratch GPT-2, ~0.9M parameters, exported as training exports one) for a fixed
time each, all in one run on the same machine: requests/s, p50/p99 latency, errors. Greedy
`/v1/completions` with the same questions and `max_tokens` everywhere; the three servers' outputs
are checked equal first. Then a soak: 64 clients for 60 s against the batched server, counting 5xx.

    python benchmarks/serve_load.py [--clients 32] [--seconds 20] [--max-tokens 32] [--soak-seconds 60]

Targets (issue 11): at 32 clients batched >= 4x unbatched and ahead of the plain server, p99
bounded, 0 errors; the soak with 0 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the plain server


def plain_server(folder: str, port: int) -> None:
    """What a user would otherwise write: FastAPI + uvicorn, one process, `model.generate` per request."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    app = FastAPI()

    @app.post("/v1/completions")
    def completions(body: dict):
        ids = tok(body["prompt"] + " ###", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=body.get("max_tokens", 16), do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        return {"choices": [{"index": 0, "text": tok.decode(new, skip_special_tokens=True)}],
                "usage": {"completion_tokens": int(new.shape[0])}}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --------------------------------------------------------------------------- load


async def closed_loop(url: str, prompts: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    import aiohttp

    latencies, statuses, tokens = [], {}, []
    deadline = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def client(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                body = {"model": "student", "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens}
                t0 = time.perf_counter()
                try:
                    async with session.post(url, json=body) as r:
                        data = await r.read()
                        status = r.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    status, data = type(e).__name__, b""
                if time.perf_counter() <= deadline:  # count what finished inside the window only
                    latencies.append(time.perf_counter() - t0)
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        tokens.append(json.loads(data)["usage"]["completion_tokens"])
                i += clients

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    lat = sorted(latencies)
    return {"clients": clients, "seconds": seconds, "requests": len(lat), "ok": ok, "rps": ok / min(wall, seconds),
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "errors": len(lat) - ok, "5xx": sum(n for s, n in statuses.items() if isinstance(s, int) and s >= 500),
            "statuses": statuses, "mean_tokens": statistics.mean(tokens) if tokens else 0}


def load(url, prompts, clients, seconds, max_tokens) -> dict:
    asyncio.run(closed_loop(url, prompts, 4, 2.0, max_tokens))  # warm-up, not counted
    return asyncio.run(closed_loop(url, prompts, clients, seconds, max_tokens))


def texts(url: str, prompts: list[str], max_tokens: int) -> list[str]:
    import httpx

    return [httpx.post(url, json={"model": "student", "prompt": q, "max_tokens": max_tokens}, timeout=60)
            .json()["choices"][0]["text"] for q in prompts]


# --------------------------------------------------------------------------- the run


def deploy(folder: Path, port: int, batch: int, name: str):
    from ray import serve

    from ftcot_ray.config import load_config
    from ftcot_ray.serve.app import build_application
    from ftcot_ray.serve.students import resolve

    cfg = load_config("quickstart", [f"serve.students={{student: {folder}}}", f"serve.port={port}",
                                     f"serve.max_batch_size={batch}", "serve.max_ongoing_requests=64",
                                     "serve.max_queued_requests=512", "serve.batch_wait_timeout_s=0.005",
                                     "serve.cpus_per_replica=1", "serve.torch_threads=2", "serve.ingress_cpus=0",
                                     f"serve.app_name={name}"])
    serve.run(build_application(cfg, resolve(cfg)[0]), name=name, route_prefix="/")
    return cfg


def batch_stats(name: str) -> dict:
    from ray import serve

    from ftcot_ray.serve.app import deployment_name

    return serve.get_deployment_handle(deployment_name("student"), app_name=name).stats.remote().result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--soak-clients", type=int, default=64)
    ap.add_argument("--soak-seconds", type=float, default=60.0, help="0: no soak")
    ap.add_argument("--plain-server", nargs=2, metavar=("FOLDER", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_server:
        return plain_server(args.plain_server[0], int(args.plain_server[1]))

    import ray
    from ray import serve

    from ftcot_ray.config import DataConfig
    from ftcot_ray.student.export import export_untrained
    from ftcot_ray.tasks.synthetic import load_coin_flip

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import free_port

    tmp = Path(tempfile.mkdtemp(prefix="ftcot_serve_bench_"))
    questions = [q["question"] for q in load_coin_flip(None, DataConfig(difficulty=5, train_size=200, test_size=0,
                                                                         seed=3))]
    folder = export_untrained(tmp / "student", questions * 2, weight_scale=4.0)
    prompts = questions[:64]
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/completions"
    rows = {}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(folder, port, 32, "batched")
    reference = texts(url, prompts[:8], args.max_tokens)
    rows["ray-serve batched"] = load(url, prompts, args.clients, args.seconds, args.max_tokens)
    stats = batch_stats("batched")
    rows["ray-serve batched"]["rows_per_batch"] = stats["rows"] / max(1, stats["batches"])
    if args.soak_seconds > 0:
        rows["soak (batched)"] = asyncio.run(closed_loop(url, prompts, args.soak_clients, args.soak_seconds,
                                                         args.max_tokens))
    serve.delete("batched")
    deploy(folder, port, 1, "unbatched")
    same_unbatched = texts(url, prompts[:8], args.max_tokens) == reference
    rows["ray-serve unbatched"] = load(url, prompts, args.clients, args.seconds, args.max_tokens)
    serve.shutdown()
    ray.shutdown()

    plain_port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--plain-server", str(folder), str(plain_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        plain_url = f"http://127.0.0.1:{plain_port}/v1/completions"
        _wait(f"http://127.0.0.1:{plain_port}/health")
        same_plain = texts(plain_url, prompts[:8], args.max_tokens) == reference
        rows["plain uvicorn+transformers"] = load(plain_url, prompts, args.clients, args.seconds, args.max_tokens)
    finally:
        proc.terminate()
        proc.wait(30)
    report(rows, args, same_unbatched, same_plain)


def _wait(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def report(rows: dict, args, same_unbatched: bool, same_plain: bool) -> None:
    import torch

    print(f"serve_load: tiny GPT-2 student (~0.9M params), greedy /v1/completions, max_tokens={args.max_tokens}, "
          f"closed-loop clients")
    print(f"machine: {os.cpu_count()} CPU cores, {platform.platform()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}")
    print(f"outputs equal to the batched server's: unbatched {same_unbatched}, plain {same_plain}")
    print()
    head = f"{'server':<28}{'clients':>8}{'secs':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'5xx':>6}" \
           f"{'tok/req':>9}{'rows/batch':>11}"
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        rpb = f"{r['rows_per_batch']:.1f}" if "rows_per_batch" in r else "-"
        print(f"{name:<28}{r['clients']:>8}{r['seconds']:>6.0f}{r['rps']:>9.1f}{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}"
              f"{r['errors']:>8}{r['5xx']:>6}{r['mean_tokens']:>9.1f}{rpb:>11}")
    b, u, p = rows["ray-serve batched"], rows["ray-serve unbatched"], rows["plain uvicorn+transformers"]
    print()
    checks = [(f"batched / unbatched = {b['rps'] / u['rps']:.1f}x (target >= 4x)", b["rps"] >= 4 * u["rps"]),
              (f"batched / plain = {b['rps'] / p['rps']:.1f}x (target > 1x)", b["rps"] > p["rps"]),
              (f"batched p99 {b['p99_ms']:.0f} ms = {b['p99_ms'] / b['p50_ms']:.1f}x its p50 (bounded: < 5x)",
               b["p99_ms"] < 5 * b["p50_ms"]),
              (f"batched errors {b['errors']} (target 0)", b["errors"] == 0)]
    if "soak (batched)" in rows:
        s = rows["soak (batched)"]
        checks.append((f"soak {s['clients']} clients x {s['seconds']:.0f} s: {s['ok']} ok, {s['5xx']} 5xx "
                       f"(target 0 5xx)", s["5xx"] == 0 and s["errors"] == 0))
    for text, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")


if __name__ == "__main__":
    main()
