#!/usr/bin/env python3
"""On a GPU machine: VRAM through model switches. One node on DEVICE and one coordinator with
the admin API serve model A; then `POST /admin/models/switch` goes A -> B -> A ... SWITCHES
times. After each switch one request is served by the new model, and VRAM is read from
outside (nvidia-smi) and from inside (the node's /metrics: pool reserved and used, attributed
bytes; /v1/cluster: each slice's model and bytes). JSON lines on stdout and in OUT.

    python3 scripts/gpu_switch.py --bin BIN --a MODELS/A.gguf --b MODELS/B.gguf \
        [--device cuda:0] [--switches 10]

A and B must be in the same folder (the node's models folder). Needs python3 and nvidia-smi.
"""
import argparse
import json
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check as g  # noqa: E402  (spawn, vram_mib, pool, log, completion)

KEY = "switch-bench-key"


def admin(url, method, path, body=None):
    req = urllib.request.Request(f"{url}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json",
                                          "authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def slices(url):
    """Every slice the node holds: (model, state, MiB)."""
    v = g.http(f"{url}/v1/cluster", timeout=20)
    return [(s["model"], s["state"], round(s["bytes"] / 2**20, 1))
            for n in v["nodes"] for s in n.get("slices", [])]


def settled(gpu, within=15.0):
    """nvidia-smi's reading once two reads 0.5 s apart agree (the old model's lease is
    released when its connections close, a moment after the switch answers)."""
    last = g.vram_mib(gpu)
    t = time.time()
    while time.time() - t < within:
        time.sleep(0.5)
        now = g.vram_mib(gpu)
        if now == last:
            return now
        last = now
    return last


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--switches", type=int, default=10)
    a = ap.parse_args()
    os.makedirs(g.OUT, exist_ok=True)
    gpu = int(a.device.split(":")[1]) if ":" in a.device else None
    models_dir = os.path.dirname(os.path.abspath(a.a))
    g.log("switch", phase="before node", mib=g.vram_mib(gpu))
    node, naddr = g.spawn([f"{a.bin}/shard-node", "serve", "--listen", "127.0.0.1:0", "--device",
                           a.device, "--models-dir", models_dir, "--heartbeat-ms", "500",
                           "--lease-ttl-ms", "2000", "--metrics-listen",
                           f"127.0.0.1:{g.METRICS_PORT}"], "node")
    coord = None
    try:
        time.sleep(1)
        g.log("switch", phase="node idle", mib=settled(gpu), node=g.pool())
        coord, url = g.spawn([f"{a.bin}/coordinator", "serve", "--http", "127.0.0.1:0",
                              "--model", os.path.abspath(a.a), "--max-ctx", "1024",
                              "--nodes", naddr, "--admin-key", KEY], "coord")
        url = f"http://{url}"
        ids = [os.path.basename(m)[:-len(".gguf")] for m in (a.a, a.b)]
        files = [os.path.basename(m) for m in (a.a, a.b)]
        served = 0
        out = g.http(f"{url}/v1/completions", {"model": ids[0], "prompt": "warm up",
                                                "max_tokens": 8, "temperature": 0})
        g.log("switch", phase=f"{ids[0]} served", mib=settled(gpu), node=g.pool(),
              slices=slices(url), tokens=out["usage"]["completion_tokens"])
        levels = {ids[0]: [], ids[1]: []}
        for i in range(a.switches):
            to = 1 - served
            t = time.time()
            r = admin(url, "POST", "/admin/models/switch", {"from": ids[served], "to": files[to]})
            secs = round(time.time() - t, 2)
            served = to
            out = g.http(f"{url}/v1/completions", {"model": ids[served], "prompt": "after a switch",
                                                    "max_tokens": 8, "temperature": 0})
            mib = settled(gpu)
            levels[ids[served]].append(mib)
            g.log("switch", phase=f"switch {i + 1}: {ids[served]} served", mib=mib, secs=secs,
                  order=r.get("order"), drained=r.get("drained"), node=g.pool(),
                  slices=slices(url), tokens=out["usage"]["completion_tokens"])
        g.log("switch-summary", levels=levels,
              spread_mib={k: (max(v) - min(v)) if v and all(isinstance(x, int) for x in v) else None
                          for k, v in levels.items()})
    finally:
        for p in (coord, node):
            if p is not None:
                p.kill()
                p.wait()
    time.sleep(1)
    g.log("switch", phase="all stopped", mib=g.vram_mib(gpu))


if __name__ == "__main__":
    sys.exit(main())
