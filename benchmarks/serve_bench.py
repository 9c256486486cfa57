"""What serving every budget from one set of weights costs (issue 21). One JSON line at the end.

    python benchmarks/serve_bench.py --checkpoint demo_out/elastic [--long 64] [--requests 200]

1. memory: RSS and tensor bytes of a process holding the engine with every budget against one
   holding only the full model (the parent's weights alone), each in its own process; beside them
   the bytes of the budgets exported as separate models (what three processes would hold).
2. decode speed: tokens/s of each budget through the engine (views of the parent) against the same
   subnet exported at its own size (generate's cut, inference.CachedDecoder), interleaved rounds.
3. budget schedule on the demo's long problems: think with the smallest budget, answer with the
   full one, beside each budget alone: exact-match accuracy and wall time.
4. concurrency: the real HTTP server, 16 client threads, `--requests` requests mixing three
   budgets, each answer compared with the same request made alone (greedy); p50 / p99 latency.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cfg(checkpoint: str):
    from elastic_megatron.formats.hf_jobs import resolve_export_config

    return resolve_export_config(None, checkpoint, [])


def memory_child(checkpoint: str, which: str) -> dict:
    """In a fresh process: RSS after loading the engine with every budget ('all') or the full model only."""
    import gc

    from elastic_megatron.serve.engine import Engine

    from elastic_megatron.serve.report import engine_memory

    e = Engine.load(_cfg(checkpoint), [] if which == "all" else ["1.0"])
    gc.collect()
    return {"rss_mib": round(_rss_mib(), 1), **engine_memory(e),
            "budgets": [b.id for b in e.budgets], "params": [b.params for b in e.budgets]}


def memory(checkpoint: str) -> dict:
    out = {}
    for which in ("full", "all"):
        p = subprocess.run([sys.executable, __file__, "--checkpoint", checkpoint, "--memory-child", which],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
        out[which] = json.loads(p.stdout.strip().splitlines()[-1])
    return {**out, "rss_all_vs_full": round(out["all"]["rss_mib"] / out["full"]["rss_mib"], 3)}


def concurrency(checkpoint: str, n_requests: int, clients: int, seed: int) -> dict:
    import httpx

    from elastic_megatron.data.synthetic import heldout_problems
    from elastic_megatron.demo import SHORT_STEPS

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    # --port 0: the server binds a port the OS picks and prints it, so nothing can take it in between
    proc = subprocess.Popen([sys.executable, "-m", "elastic_megatron.cli", "serve", "--checkpoint", checkpoint,
                             "--port", "0"], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    found = re.search(r" on (http://\S+)/v1$", line.strip())
    if not found:
        proc.kill()
        raise SystemExit(f"the server did not start: {line.strip() or proc.communicate()[0]}")
    url = found.group(1)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"] if m["id"] == m["root"]][:3]
        problems = heldout_problems(n_requests, seed=seed + 1, min_steps=SHORT_STEPS[0], max_steps=SHORT_STEPS[1])
        jobs = [(ids[i % len(ids)], p.prompt) for i, p in enumerate(problems)]
        client = httpx.Client(base_url=url, timeout=600)

        def ask(job):
            t = time.perf_counter()
            r = client.post("/v1/completions", json={"model": job[0], "prompt": job[1], "max_tokens": 120,
                                                     "temperature": 0})
            return r.status_code, (r.json()["choices"][0]["text"] if r.status_code == 200 else r.text), \
                time.perf_counter() - t

        t = time.perf_counter()
        alone = [ask(j) for j in jobs]  # one at a time: the reference answers
        alone_wall = time.perf_counter() - t
        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as ex:
            together = list(ex.map(ask, jobs))
        wall = time.perf_counter() - t
        lat = sorted(x[2] for x in together)
        return {"requests": n_requests, "clients": clients, "models": ids,
                "ok": sum(x[0] == 200 for x in together), "lost": sum(x[0] != 200 for x in together),
                "equal_to_alone": sum(a[1] == b[1] for a, b in zip(alone, together)),
                "p50_s": round(lat[len(lat) // 2], 3), "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
                "wall_s": round(wall, 2), "sequential_wall_s": round(alone_wall, 2)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="demo_out/elastic")
    ap.add_argument("--long", type=int, default=64)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--memory-child", default="")
    args = ap.parse_args()
    from elastic_megatron.compat import install

    install()
    if args.memory_child:
        print(json.dumps(memory_child(args.checkpoint, args.memory_child)))
        return 0
    t0 = time.perf_counter()
    res = {"threads": torch.get_num_threads(), "memory": memory(args.checkpoint)}
    from elastic_megatron.serve.report import decode_speed, schedule_accuracy

    cfg = _cfg(args.checkpoint)
    res["decode"] = decode_speed(cfg, args.batch, args.steps, args.rounds)
    res["schedule"] = schedule_accuracy(cfg, args.long, args.seed)
    res["concurrency"] = concurrency(args.checkpoint, args.requests, args.clients, args.seed)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
