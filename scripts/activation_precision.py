#!/usr/bin/env python3
"""What sending activations between stages at half precision does to the output.

  python3 scripts/activation_precision.py --bin-dir target/ci --model models/X.gguf \
      [--stages 2] [--precisions f16,bf16] [--prompts 24] [--tokens 64] [--devices cpu]

Starts one cluster of --stages nodes on loopback for f32 (the default) and one for each of
--precisions (`shard-node serve --activations P` on every node), sends each of --prompts
greedy completions of --tokens tokens to all of them, and prints one JSON line per precision:
how many answers equal f32's, and for those that differ, after how many characters they part
(a late parting is a near-tie that tipped; an early one would be a real loss). Also the bytes
each cluster's first node sent on (`shard_activation_bytes_sent_total`).
"""
import argparse, json, os, sys, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cluster import METRICS, post, spawn  # noqa: E402

SUBJECTS = ["a lighthouse", "the moon", "bread", "a city at night", "rivers", "chess",
            "a violin", "winter", "bees", "the ocean floor", "a train journey", "volcanoes"]


def prompts(n):
    out = []
    for i in range(n):
        s = SUBJECTS[i % len(SUBJECTS)]
        out.append(f"Question {i}: write three sentences about {s}.\nAnswer:" if i % 2 else
                   f"Chapter {i // 2 + 1}. The history of {s} begins")
    return out


def complete(url, prompt, tokens):
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0}
    with post(url + "/v1/completions", body, False) as r:
        return json.loads(r.read())["choices"][0]["text"]


def sent_bytes(metrics_addr):
    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name == "shard_activation_bytes_sent_total":
                return float(value)
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--precisions", default="f16,bf16")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--devices", default="cpu")
    a = ap.parse_args()
    if a.stages < 2:
        ap.error("--stages must be at least 2: one stage sends no activations")
    devices = a.devices.split(",")
    models_dir = os.path.dirname(os.path.abspath(a.model))
    procs = []

    def cluster(precision):
        addrs, first_metrics = [], None
        for i in range(a.stages):
            p, addr = spawn([os.path.join(a.bin_dir, "shard-node"), "serve", "--listen",
                             "127.0.0.1:0", "--threads", str(a.threads), "--models-dir",
                             models_dir, "--device", devices[i % len(devices)],
                             "--metrics-listen", "127.0.0.1:0", "--activations", precision])
            procs.append(p)
            addrs.append(addr)
            first_metrics = first_metrics or METRICS[p.pid]
        p, http = spawn([os.path.join(a.bin_dir, "coordinator"), "serve", "--http",
                         "127.0.0.1:0", "--model", a.model, "--nodes", ",".join(addrs)])
        procs.append(p)
        return "http://" + http, first_metrics

    try:
        names = ["f32"] + [p for p in a.precisions.split(",") if p]
        clusters = {n: cluster(n) for n in names}
        texts = {n: [] for n in names}
        for prompt in prompts(a.prompts):
            for n, (url, _) in clusters.items():
                texts[n].append(complete(url, prompt, a.tokens))
        for n in names[1:]:
            parted = []
            for x, y in zip(texts["f32"], texts[n]):
                if x != y:
                    parted.append(next((i for i, (c, d) in enumerate(zip(x, y)) if c != d),
                                       min(len(x), len(y))))
            print(json.dumps({
                "precision": n, "stages": a.stages, "devices": devices[:a.stages],
                "prompts": a.prompts, "tokens": a.tokens,
                "equal_to_f32": a.prompts - len(parted),
                "parted_at_chars": sorted(parted),
                "answer_chars_mean": sum(map(len, texts["f32"])) / max(a.prompts, 1),
                "first_node_bytes_sent": sent_bytes(clusters[n][1]),
                "f32_first_node_bytes_sent": sent_bytes(clusters["f32"][1]),
            }), flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
