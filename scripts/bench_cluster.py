#!/usr/bin/env python3
"""Cluster benchmark on loopback: real shard-node and coordinator processes, driven over HTTP.

  python3 scripts/bench_cluster.py --bin-dir target/release [--bin-dir OTHER] --model models/X.gguf \
      [--threads 2] [--runs 3] [--tokens 128] [--streams 1,4,16] [--stages 1,2,3] \
      [--aggregate-stages 1] [--devices cpu | cuda:0,cuda:1,...]

All the clusters (one per stage count) start first. Then it measures single-stream decode
tok/s (time between the first and last streamed token, so prefill is excluded), --runs times
per stage count, going round the stage counts; it also reports the median and 90th
percentile of the gaps between tokens. For the stage counts in --aggregate-stages it also
measures aggregate tok/s with 1, 4 and 16 concurrent streams (completion tokens over wall
time), --runs times each, interleaved. Node i runs on device i mod len(--devices). Prints
JSON lines.

--traces compares trace export in the same way: every build runs twice, once exporting its
spans over OTLP to an `otlp-sink` (built beside the binaries, in the first --bin-dir) and once
with export off; lines then carry "traces". The first stage count is the baseline of each.

--tls compares mutual TLS on every tarpc link with plain TCP the same way: certificates are
made with the build's own `coordinator certs` in a temporary folder; lines carry "tls".

--activations f16 (or f16,bf16) compares the nodes' `--activations` precisions with f32 the
same way; lines carry "activations". (scripts/activation_precision.py measures what the
precision does to the output.)

--replies chain compares the coordinator's `--replies chain` (each token back through every
stage) with the default, `direct` (the coordinator collects it from the last stage); lines
carry "replies".

The decode lines of a variant (export, TLS or a precision on) also carry "paired_ratios":
each run's tok/s over the same build's plain run of the same round, and their median
("paired_ratio_median"), which a slow spell of the machine moves less than the means.

--bin-dir may be given more than once (say, a build before and after a change): each build
gets its own clusters, and every round goes through all of them, so the builds are compared
within one run of the machine. Lines then carry "bin_dir".
`ignore_eos` keeps every stream generating exactly --tokens tokens.

Each node serves its metrics, and the decode lines also split a token's time in two:
"pass_ms", the node passes (each node's compute time per pass from
`shard_forward_seconds_total`, counted from the first streamed token on, so without the
prompt's pass, give or take the one in flight then, summed over the stages), and
"outside_ms", the rest of the mean gap between tokens (hops between stages, the coordinator,
HTTP). "cpu_ms_per_token" is the CPU time (user and system, from /proc) that the cluster's
processes (its nodes and coordinator) spent per decoded token over the timed streams: on a
machine whose cores the processes share, a steadier measure of a change's cost than tok/s. Where the stages share CPU cores, the end of one stage's pass (its sends) overlaps
the start of the next stage's, so there "pass_ms" runs high and "outside_ms" low.
"""
import argparse, json, os, subprocess, sys, tempfile, threading, time, urllib.error, urllib.request

PROMPT = "Write a long story about a lighthouse keeper who finds a map in a bottle."


# The metrics address each node printed ("metrics on ADDR", before "listening on"), by pid.
METRICS = {}


def spawn(cmd):
    err = open(os.path.join(os.environ.get("OUT", "/tmp"), os.path.basename(cmd[0]) + ".err"), "a")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                         env={**os.environ, "RUST_LOG": "warn"})
    for line in p.stdout:
        if line.startswith("metrics on "):
            METRICS[p.pid] = line.split(" on ", 1)[1].strip()
        if line.startswith("listening on "):
            return p, line.split(" on ", 1)[1].strip()
    raise RuntimeError(f"{cmd[0]} did not start")


def post(url, body, stream):
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


def stream_times(url, tokens, on_first=None):
    """Streams one completion; returns the text chunks' arrival times. `on_first` is called
    once the first chunk is in (the prompt's pass is done)."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    times = []
    with post(url + "/v1/completions", body, True) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                if ev.get("error"):
                    raise RuntimeError(f"stream failed: {ev['error']}")
                if ev.get("choices") and ev["choices"][0].get("text"):
                    times.append(time.perf_counter())
                    if on_first and len(times) == 1:
                        on_first()
    if len(times) < 2:
        raise RuntimeError(f"stream gave {len(times)} text chunks for {tokens} tokens")
    return times


def node_passes(addr):
    """(seconds, passes) of a node's forward passes so far, from its metrics."""
    total = [0.0, 0.0]
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name == "shard_forward_seconds_total":
                total[0] = float(value)
            elif name == "shard_forward_batches_total":
                total[1] = float(value)
    return total


def complete(url, tokens, out, i):
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    try:
        with post(url + "/v1/completions", body, False) as r:
            out[i] = json.loads(r.read())["usage"]["completion_tokens"]
    except urllib.error.HTTPError as e:
        out[i] = 0
        print(json.dumps({"error": e.code, "body": e.read().decode()[:500]}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True, action="append")
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--aggregate-stages", default="1",
                    help="comma-separated stage counts at which to measure aggregate tok/s")
    ap.add_argument("--traces", action="store_true",
                    help="each build with trace export to an otlp-sink and without")
    ap.add_argument("--tls", action="store_true",
                    help="each build with mutual TLS on its links and without")
    ap.add_argument("--replies", default="",
                    help="also run with the coordinator's --replies set to this (chain)")
    ap.add_argument("--activations", default="",
                    help="comma-separated precisions (f16, bf16) compared with f32")
    ap.add_argument("--devices", default="cpu",
                    help="comma-separated; node i runs on device i mod len (e.g. cuda:0,cuda:1)")
    a = ap.parse_args()
    devices = a.devices.split(",")
    models_dir = os.path.dirname(os.path.abspath(a.model))
    stage_counts = [int(s) for s in a.stages.split(",")]
    procs = []
    sink = None
    if a.traces:
        p, sink = spawn([os.path.join(a.bin_dir[0], "otlp-sink")])
        procs.append(p)
        sink = "http://" + sink
    # a variant is a build with trace export on (an endpoint) or off (None), TLS on (a
    # folder of certificates) or off (None), the nodes' activations (None: f32) and the
    # coordinator's replies (None: direct)
    certs = None
    if a.tls:
        certs = tempfile.mkdtemp(prefix="bench-certs-")
        coord_bin = os.path.join(a.bin_dir[0], "coordinator")
        subprocess.run([coord_bin, "certs", "init", "--out", certs + "/ca"], check=True,
                       stdout=subprocess.DEVNULL)
        for name, role in [("coord", "coordinator")] + [(f"node-{i}", "node") for i in range(8)]:
            subprocess.run([coord_bin, "certs", "issue", "--ca", certs + "/ca", "--role", role,
                            "--name", name, "--san", "127.0.0.1", "--out", certs],
                           check=True, stdout=subprocess.DEVNULL)
    variants = [(None, None, None, None)]
    if a.traces:
        variants.append((sink, None, None, None))
    if a.tls:
        variants.append((None, certs, None, None))
    variants += [(None, None, p, None) for p in a.activations.split(",") if p]
    variants += [(None, None, None, r) for r in a.replies.split(",") if r]
    bins = [(b, *v) for b in a.bin_dir for v in variants]

    def tls_flags(certs, name):
        if not certs:
            return []
        return ["--tls-ca", certs + "/ca/ca.pem", "--tls-cert", f"{certs}/{name}.pem",
                "--tls-key", f"{certs}/{name}-key.pem"]

    metrics = {}
    pids = {}

    def cpu_seconds(url, which=None):
        """CPU seconds of the cluster's processes (which: "coordinator" or "nodes" only)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        ps = pids[url]
        if which == "coordinator":
            ps = ps[-1:]
        elif which == "nodes":
            ps = ps[:-1]
        for pid in ps:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / tick

    def start(variant, stages):
        bin_dir, otlp, tls, act, replies = variant
        traced = ["--otlp-endpoint", otlp] if otlp else []
        precision = ["--activations", act] if act else []
        addrs, mets, ps = [], [], []
        for i in range(stages):
            p, addr = spawn([os.path.join(bin_dir, "shard-node"), "serve", "--listen",
                             "127.0.0.1:0", "--threads", str(a.threads), "--models-dir",
                             models_dir, "--device", devices[i % len(devices)],
                             "--metrics-listen", "127.0.0.1:0"] + traced + precision
                            + tls_flags(tls, f"node-{i}"))
            procs.append(p)
            ps.append(p.pid)
            addrs.append(addr)
            mets.append(METRICS[p.pid])
        p, http = spawn([os.path.join(bin_dir, "coordinator"), "serve", "--http",
                         "127.0.0.1:0", "--max-ctx", "2048", "--model", a.model, "--nodes",
                         ",".join(addrs)] + traced + tls_flags(tls, "coord")
                        + (["--replies", replies] if replies else []))
        procs.append(p)
        url = "http://" + http
        metrics[url] = mets
        pids[url] = ps + [p.pid]
        stream_times(url, 16)  # warm-up
        return url

    def tag(v):
        t = {"bin_dir": v[0]} if len(a.bin_dir) > 1 else {}
        if a.traces:
            t["traces"] = v[1] is not None
        if a.tls:
            t["tls"] = v[2] is not None
        if a.activations:
            t["activations"] = v[3] or "f32"
        if a.replies:
            t["replies"] = v[4] or "direct"
        return t

    try:
        # Every cluster is up before any is timed (an idle node's threads sleep), and the
        # decode runs go round the builds and stage counts (1, 2, 3, 1, 2, 3, ...), so a slow
        # spell of the machine does not land on one of them only.
        urls = {(b, n): start(b, n) for b in bins for n in stage_counts}
        rates = {k: [] for k in urls}
        gaps = {k: [] for k in urls}
        split = {k: [] for k in urls}
        cpu = {k: [] for k in urls}
        for _ in range(a.runs):
            for k, url in urls.items():
                before = []
                c0 = cpu_seconds(url)
                t = stream_times(url, a.tokens, lambda: before.extend(
                    node_passes(m) for m in metrics[url]))
                cpu[k].append((cpu_seconds(url) - c0) * 1e3 / len(t))
                after = [node_passes(m) for m in metrics[url]]
                rates[k].append((len(t) - 1) / (t[-1] - t[0]))
                gaps[k] += [(y - x) * 1e3 for x, y in zip(t, t[1:])]
                passes = sum((y[0] - x[0]) / max(y[1] - x[1], 1) for x, y in zip(before, after))
                split[k].append((passes * 1e3, (t[-1] - t[0]) / (len(t) - 1) * 1e3))
        def paired(b, n):
            # Against the same build's first variant (export, TLS, precision off), run by
            # run: both ran in the same round, so a slow spell of the machine cancels out.
            ref = (b[0], None, None, None, None)
            if b == ref or (ref, n) not in rates:
                return {}
            r = sorted(x / y for x, y in zip(rates[(b, n)], rates[(ref, n)]))
            return {"paired_ratios": r, "paired_ratio_median": r[len(r) // 2]}

        for b in bins:
            base = sum(rates[(b, stage_counts[0])]) / a.runs
            for n in stage_counts:
                mean = sum(rates[(b, n)]) / a.runs
                g = sorted(gaps[(b, n)])
                pass_ms = sum(x for x, _ in split[(b, n)]) / a.runs
                gap_ms = sum(y for _, y in split[(b, n)]) / a.runs
                print(json.dumps({**tag(b), "bench": "decode", "stages": n,
                                  "threads": a.threads, "devices": devices[:n],
                                  "tokens": a.tokens, "tok_s": rates[(b, n)], "mean": mean,
                                  "median": sorted(rates[(b, n)])[a.runs // 2],
                                  f"vs_{stage_counts[0]}_stages": mean / base,
                                  "gap_p50_ms": g[len(g) // 2],
                                  "gap_p90_ms": g[int(len(g) * 0.9)],
                                  "gap_p99_ms": g[int(len(g) * 0.99)], "gap_max_ms": g[-1],
                                  # the steps a trace records in full (one in 32) show here
                                  "gap_mean_ms": sum(g) / len(g),
                                  "pass_ms": pass_ms, "outside_ms": gap_ms - pass_ms,
                                  "cpu_ms_per_token": sum(cpu[(b, n)]) / a.runs,
                                  **paired(b, n)}),
                      flush=True)
        counts = [int(s) for s in a.streams.split(",")]
        for stages in [int(x) for x in a.aggregate_stages.split(",") if x]:
            agg_urls = {b: urls.get((b, stages)) or start(b, stages) for b in bins}
            # Each stream count --runs times, interleaved (1, 4, 16, 1, 4, 16, ...).
            agg = {(b, n): [] for b in bins for n in counts}
            agg_cpu = {(b, n): [] for b in bins for n in counts}
            agg_coord = {(b, n): [] for b in bins for n in counts}
            for _ in range(a.runs):
                for n in counts:
                    for b in bins:
                        out = [0] * n
                        c0 = cpu_seconds(agg_urls[b])
                        k0 = cpu_seconds(agg_urls[b], "coordinator")
                        th = [threading.Thread(target=complete,
                                               args=(agg_urls[b], a.tokens, out, i))
                              for i in range(n)]
                        t0 = time.perf_counter()
                        for x in th:
                            x.start()
                        for x in th:
                            x.join()
                        agg[(b, n)].append(sum(out) / (time.perf_counter() - t0))
                        agg_cpu[(b, n)].append(
                            (cpu_seconds(agg_urls[b]) - c0) * 1e3 / max(sum(out), 1))
                        agg_coord[(b, n)].append(
                            (cpu_seconds(agg_urls[b], "coordinator") - k0) * 1e3
                            / max(sum(out), 1))
            for b in bins:
                base = sum(agg[(b, counts[0])]) / a.runs
                for n in counts:
                    mean = sum(agg[(b, n)]) / a.runs
                    print(json.dumps({**tag(b), "bench": "aggregate", "streams": n,
                                      "stages": stages, "threads": a.threads,
                                      "tokens_per_stream": a.tokens, "tok_s": agg[(b, n)],
                                      "mean": mean, f"vs_{counts[0]}_stream": mean / base,
                                      "median": sorted(agg[(b, n)])[a.runs // 2],
                                      "cpu_ms_per_token": sum(agg_cpu[(b, n)]) / a.runs,
                                      "coordinator_cpu_ms_per_token":
                                          sum(agg_coord[(b, n)]) / a.runs}),
                          flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
