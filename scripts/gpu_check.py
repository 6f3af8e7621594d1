#!/usr/bin/env python3
"""One run on a GPU machine: build check, correctness against the CPU, VRAM through faults, and
timings. Everything is logged to OUT (default $OUT or ./gpu-out) as JSON lines plus logs.

    python3 scripts/gpu_check.py --bin .gpu/bin --model MODEL.gguf [--device cuda:0] [--quick]

Needs only python3, curl and nvidia-smi; the binaries are the CUDA ones built by
scripts/build-cuda.sh. VRAM is read from outside (nvidia-smi) and from inside (the node's
status, which uses cudarc's mem_get_info on CUDA).
"""
import argparse
import json
import os
import shutil
import socket
import signal
import subprocess
import sys
import threading
import time
import urllib.request

OUT = os.environ.get("OUT", "gpu-out")
RESULTS = []


def log(kind, **kv):
    kv["kind"] = kind
    kv["t"] = round(time.time(), 3)
    RESULTS.append(kv)
    print(json.dumps(kv), flush=True)
    with open(os.path.join(OUT, "results.jsonl"), "a") as f:
        f.write(json.dumps(kv) + "\n")


def vram_mib(gpu):
    if gpu is None:
        return "n/a (cpu)"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(gpu)],
            capture_output=True, text=True, timeout=20).stdout.strip()
        return int(out.splitlines()[0])
    except Exception as e:  # noqa: BLE001
        return f"error: {e}"


def spawn(args, name):
    logf = open(os.path.join(OUT, f"{name}.log"), "a")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=logf, text=True,
                         env={**os.environ, "RUST_LOG": "info"})
    addr = None
    deadline = time.time() + 300
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        logf.write("stdout: " + line)
        if line.startswith("listening on "):
            addr = line.split(" on ", 1)[1].strip()
            break
    if addr is None:
        p.kill()
        raise RuntimeError(f"{name} did not start; see {name}.log")
    # keep draining stdout so that the child never blocks on a full pipe
    threading.Thread(target=lambda: [logf.write("stdout: " + l) for l in p.stdout], daemon=True).start()
    return p, addr


def http(url, body=None, timeout=300):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def completion(url, prompt, n, ignore_eos=False):
    return http(f"{url}/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0,
                                          "ignore_eos": ignore_eos})


def stream_in_background(url, n):
    body = json.dumps({"prompt": "Count slowly: 1, 2, 3,", "max_tokens": n, "temperature": 0,
                       "stream": True, "ignore_eos": True})
    return subprocess.Popen(["curl", "-sN", "-m", "300", "-H", "content-type: application/json",
                             "-d", body, f"{url}/v1/completions"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cluster_memory(url):
    try:
        v = http(f"{url}/v1/cluster", timeout=20)
        return [{"device_free": n["memory"]["device_free_bytes"] if n["memory"] else None,
                 "device_total": n["memory"]["device_total_bytes"] if n["memory"] else None,
                 "attributed": n["memory"]["attributed_bytes"] if n["memory"] else None,
                 "unattributed": n["memory"]["unattributed_bytes"] if n["memory"] else None}
                for n in v["nodes"]]
    except Exception as e:  # noqa: BLE001
        return f"error: {e}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()


def pool():
    """The node's own view (its /metrics): the CUDA pool's reserved and used bytes, and
    mem_get_info's free bytes, in MiB."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as r:
            text = r.read().decode()
        vals = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#"):
                vals[parts[0]] = float(parts[1])
        mib = lambda k: round(vals[k] / 2**20, 1) if k in vals else None  # noqa: E731
        return {"pool_reserved_mib": mib("shard_device_pool_reserved_bytes"),
                "pool_used_mib": mib("shard_device_pool_used_bytes"),
                "device_free_mib": mib("shard_device_free_bytes"),
                "attributed_mib": mib("shard_attributed_bytes"),
                "handles": vals.get("shard_device_handles")}
    except Exception as e:  # noqa: BLE001
        return f"error: {e}"


def run(cmd, name, timeout=600, env=None):
    t = time.time()
    full = dict(os.environ, **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full)
    with open(os.path.join(OUT, f"{name}.log"), "a") as f:
        f.write(f"$ {env or ''} {' '.join(cmd)}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}\n")
    return p.returncode, p.stdout, round(time.time() - t, 2)


PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):"]


def correctness(a, dev):
    for i, prompt in enumerate(PROMPTS):
        outs = {}
        for d in ["cpu", dev]:
            rc, out, secs = run([f"{a.bin}/shard-node", "generate", "--model", a.model, "--device", d,
                                 "--max-tokens", "48", "--prompt", prompt], f"generate-{d.replace(':', '')}")
            outs[d] = out if rc == 0 else f"FAILED rc={rc}"
        log("correctness", prompt=prompt, equal=outs["cpu"] == outs[dev], cpu=outs["cpu"], gpu=outs[dev])
        rc, out, secs = run([f"{a.bin}/shard-node", "compare", "--model", a.model, "--device", dev,
                             "--max-tokens", "48", "--prompt", prompt], f"compare-{i}")
        lines = out.strip().splitlines()
        steps = [json.loads(l) for l in lines if l.startswith("{")]
        log("compare", prompt=prompt, rc=rc, summary=steps[-1] if steps else None,
            disagreements=[s for s in steps if "summary" not in s and s["cpu"] != s["device"]])


# The fused decode path (a block in nine launches) with our matrix-vector kernels overlapping the
# kernel before (programmatic dependent launch), the same without the overlap, the same with
# candle's mmvq, our decode-attention kernels under candle's other ops, and candle's ops
# throughout, in the same run.
ATTENTION = [("fused", {"LLMC_CUDA_ATTENTION": "1", "LLMC_CUDA_FUSED": "1", "LLMC_CUDA_MATVEC": "1",
                        "LLMC_CUDA_PDL": "1"}),
             ("fused-no-overlap", {"LLMC_CUDA_ATTENTION": "1", "LLMC_CUDA_FUSED": "1", "LLMC_CUDA_MATVEC": "1",
                                   "LLMC_CUDA_PDL": "0"}),
             ("fused-candle-mmvq", {"LLMC_CUDA_ATTENTION": "1", "LLMC_CUDA_FUSED": "1", "LLMC_CUDA_MATVEC": "0"}),
             ("kernels", {"LLMC_CUDA_ATTENTION": "1", "LLMC_CUDA_FUSED": "0"}),
             ("candle-ops", {"LLMC_CUDA_ATTENTION": "0", "LLMC_CUDA_FUSED": "0"})]


def kernels(a):
    """The CUDA-only unit tests of common (the test binary of a cuda build, if carried)."""
    test = f"{a.bin}/common-tests"
    if not os.path.exists(test):
        log("kernels", error=f"{test} not carried")
        return
    rc, out, secs = run([test, "cuda::", "--nocapture", "--test-threads", "1"], "kernels",
                        env={"LLMC_TEST_MODEL": os.path.abspath(a.model)})
    log("kernels", rc=rc, secs=secs, tail=out.strip().splitlines()[-8:])


def bench(a, dev):
    runs = [(dev, [], name, env) for name, env in ATTENTION] + [("cpu", [], "", {})]
    for d, extra, name, env in runs:
        check = ["--check-batch"] if d != "cpu" else []
        rc, out, secs = run([f"{a.bin}/shard-node", "bench", "--model", a.model, "--device", d,
                             "--prompt-tokens", "128", "--gen-tokens", "128", "--runs", "3",
                             "--batch", "16"] + check + extra,
                            f"bench-{d.replace(':', '')}", env=env)
        log("bench", device=d, attention=name, extra=extra, rc=rc,
            out=out.strip().splitlines()[-7:] if out else [])


PEER = r"""
import json, sys, time, torch
out = {"torch": torch.__version__}
dev = torch.device("cuda:0")
x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
torch.cuda.synchronize()
t = time.time()
for _ in range(20):
    y.copy_(x)
torch.cuda.synchronize()
out["copy_bandwidth_gbs"] = round(2 * 20 * (1 << 30) / (time.time() - t) / 1e9, 1)
del x, y
try:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
    out["transformers"] = transformers.__version__
    cfg = LlamaConfig(vocab_size=49152, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
    torch.set_default_dtype(torch.float16)
    with torch.device(dev):
        m = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 49152, (1, 128), device=dev)
    with torch.no_grad():
        m.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        torch.cuda.synchronize()
        t = time.time()
        m(ids)
        torch.cuda.synchronize()
        out["hf_fp16_prefill_tok_s"] = round(128 / (time.time() - t), 1)
        t = time.time()
        m.generate(ids, max_new_tokens=64, do_sample=False, min_new_tokens=64)
        torch.cuda.synchronize()
        dt = time.time() - t
        out["hf_fp16_decode_tok_s"] = round(64 / dt, 1)
    out["hf_weight_bytes"] = sum(p.numel() * p.element_size() for p in m.parameters())
except Exception as e:
    out["transformers_error"] = repr(e)
print(json.dumps(out))
"""


def peer(a):
    p = subprocess.run([sys.executable, "-c", PEER], capture_output=True, text=True, timeout=900)
    with open(os.path.join(OUT, "peer.log"), "w") as f:
        f.write(p.stdout + "\n" + p.stderr)
    last = p.stdout.strip().splitlines()[-1:] if p.stdout.strip() else []
    log("peer", rc=p.returncode, result=json.loads(last[0]) if last else None, stderr=p.stderr[-500:])


def synth_bench(a, dev):
    for quant in a.quants.split(","):
        path = f"/tmp/synth-8b-{quant}.gguf"
        rc, out, secs = run([f"{a.bin}/shard-node", "synth-model", "--quant", quant, "--tokenizer-from", a.model,
                             "--out", path], f"synth-{quant}", timeout=900)
        log("synth", quant=quant, rc=rc, secs=secs, bytes=os.path.getsize(path) if rc == 0 else None)
        if rc != 0:
            continue
        for name, env in ATTENTION:
            rc, out, secs = run([f"{a.bin}/shard-node", "bench", "--model", path, "--device", dev,
                                 "--prompt-tokens", "128", "--gen-tokens", "64", "--runs", "2",
                                 "--batch", "16"], f"bench-8b-{quant}", timeout=900, env=env)
            log("bench-8b", quant=quant, attention=name, rc=rc, secs=secs,
                out=out.strip().splitlines()[-4:] if out else [])
        if quant == "q4_0" and "profile" not in a.skip:
            profile(a, dev, path)
        os.remove(path)


def multi(a):
    """One node per GPU, when the machine has several: greedy output of the cluster against one
    process on cuda:0, then decode and aggregate tok/s with 1 node and with one node per GPU,
    for the default model and an 8B-shaped Q4_0 model."""
    rc, out, _ = run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], "multi-gpus")
    n = len(out.split()) if rc == 0 else 0
    if n < 2:
        log("multi", skipped=f"{n} GPU(s)")
        return
    devs = ",".join(f"cuda:{i}" for i in range(n))
    nodes, procs = [], []
    try:
        for i in range(n):
            args = node_args(a, f"cuda:{i}")
            args[-1] = f"127.0.0.1:{free_port()}"  # each node its own metrics port
            p, addr = spawn(args, f"multi-node{i}")
            procs.append(p)
            nodes.append(addr)
        p, listen = spawn(coord_args(a, nodes), "multi-coord")
        procs.append(p)
        url = "http://" + listen
        cluster = http(url + "/v1/cluster")
        for prompt in PROMPTS:
            got = completion(url, prompt, 48)["choices"][0]["text"]
            rc, ref, _ = run([f"{a.bin}/shard-node", "generate", "--model", a.model, "--device", "cuda:0",
                              "--max-tokens", "48", "--prompt", prompt], "multi-generate")
            same = 0
            while same < min(len(got), len(ref)) and got[same] == ref[same]:
                same += 1
            log("multi-correctness", gpus=n, prompt=prompt, equal=got == ref.rstrip("\n"),
                common_prefix_chars=same, cluster_text=got, single_gpu_text=ref)
        log("multi-cluster", gpus=n, plan=cluster)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    models = [a.model]
    synth = "/tmp/synth-8b-q4_0-multi.gguf"
    rc, _, _ = run([f"{a.bin}/shard-node", "synth-model", "--quant", "q4_0", "--tokenizer-from", a.model,
                    "--out", synth], "multi-synth", timeout=900)
    if rc == 0:
        models.append(synth)
    for m in models:
        rc, out, secs = run([sys.executable, os.path.join(os.path.dirname(__file__), "bench_cluster.py"),
                             "--bin-dir", a.bin, "--model", m, "--devices", devs,
                             "--stages", f"1,{n}", "--aggregate-stages", f"1,{n}",
                             "--streams", "1,4,16", "--runs", "3", "--tokens", "128"],
                            "multi-bench", timeout=900)
        log("multi-bench", gpus=n, model=os.path.basename(m), rc=rc, secs=secs,
            out=[l for l in out.splitlines() if l.startswith("{")])
    if os.path.exists(synth):
        os.remove(synth)


def tool(name):
    for p in [shutil.which(name), f"/usr/local/cuda/bin/{name}"]:
        if p and os.path.exists(p):
            return p
    return None


def profile(a, dev, path):
    """Where a decode step goes: nsys's per-kernel GPU time and CUDA API time, then ncu's
    duration of each kernel over ~2 decode steps."""
    bench = [f"{a.bin}/shard-node", "bench", "--model", path, "--device", dev,
             "--prompt-tokens", "16", "--gen-tokens", "16", "--runs", "1"]
    nsys = tool("nsys")
    if nsys:
        rc, out, secs = run([nsys, "profile", "-o", "/tmp/decode", "--force-overwrite=true", "--stats=true",
                             "--trace=cuda"] + bench, "profile-nsys", timeout=600)
        log("profile", tool="nsys", rc=rc, secs=secs, tail=out[-6000:])
    ncu = tool("ncu")
    if ncu:
        # The fused path launches ~330 kernels a step: skip the load, warm-up and prefill, then
        # take ~4 steps.
        rc, out, secs = run([ncu, "--launch-skip", "3000", "--launch-count", "1300", "--metrics",
                             "gpu__time_duration.sum", "--csv"] + bench, "profile-ncu", timeout=600)
        per = {}
        import csv
        import io
        rows = [l for l in out.splitlines() if l.startswith('"')]
        for r in csv.DictReader(io.StringIO("\n".join(rows))):
            try:
                name = r.get("Kernel Name", "?")[:90]
                v = float(r.get("Metric Value", "0").replace(",", ""))
                unit = r.get("Metric Unit", "")
                ns = v * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6}.get(unit, 1)
                c, t = per.get(name, (0, 0.0))
                per[name] = (c + 1, t + ns)
            except ValueError:
                continue
        top = sorted(per.items(), key=lambda kv: -kv[1][1])[:20]
        log("profile", tool="ncu", rc=rc, secs=secs, kernels=sum(c for c, _ in per.values()),
            total_us=round(sum(t for _, t in per.values()) / 1e3, 1),
            top=[{"kernel": k, "count": c, "us": round(t / 1e3, 1)} for k, (c, t) in top],
            tail=None if per else out[-3000:])
    if not nsys and not ncu:
        log("profile", error="neither nsys nor ncu found")


def node_args(a, dev, listen="127.0.0.1:0"):
    models = os.path.dirname(os.path.abspath(a.model))
    return [f"{a.bin}/shard-node", "serve", "--listen", listen, "--device", dev, "--models-dir", models,
            "--heartbeat-ms", "500", "--lease-ttl-ms", "2000", "--metrics-listen", f"127.0.0.1:{METRICS_PORT}"]


def coord_args(a, nodes):
    return [f"{a.bin}/coordinator", "serve", "--http", "127.0.0.1:0", "--model", a.model,
            "--max-ctx", "1024", "--nodes", ",".join(nodes)]


def wait_vram(gpu, target, within):
    """Polls nvidia-smi until used <= target (MiB) or `within` seconds; returns (mib, secs)."""
    t = time.time()
    while True:
        v = vram_mib(gpu)
        if isinstance(v, int) and v <= target:
            return v, round(time.time() - t, 2)
        if time.time() - t > within or not isinstance(v, int):
            return v, None
        time.sleep(0.2)


def memory(a, dev, gpu, quick):
    log("vram", phase="before node", mib=vram_mib(gpu))
    node, naddr = spawn(node_args(a, dev), "node")
    time.sleep(1)
    idle = vram_mib(gpu)
    log("vram", phase="node idle (CUDA context and warm-up, no slice)", mib=idle, node=pool())
    coord, url = spawn(coord_args(a, [naddr]), "coord")
    url = f"http://{url}"
    completion(url, "warm up", 16)
    loaded = vram_mib(gpu)
    log("vram", phase="slice loaded, warmed up", mib=loaded, inside=cluster_memory(url), node=pool())
    # (1) kill -9 of the coordinator while 8 long streams run
    streams = [stream_in_background(url, 600) for _ in range(8)]
    time.sleep(3)
    log("vram", phase="8 streams running", mib=vram_mib(gpu), inside=cluster_memory(url), node=pool())
    coord.send_signal(signal.SIGKILL)
    coord.wait()
    mib, secs = wait_vram(gpu, idle + 2 if isinstance(idle, int) else 0, 10)
    log("vram", phase="after coordinator kill -9", mib=mib, back_to_idle_secs=secs, idle=idle, ttl_secs=2,
        node=pool())
    for s in streams:
        s.kill()
    # (2) reload 10 times: a coordinator loads the slice, serves one request, is killed
    for i in range(3 if quick else 10):
        coord, url = spawn(coord_args(a, [naddr]), "coord")
        url = f"http://{url}"
        completion(url, "reload", 8)
        coord.send_signal(signal.SIGKILL)
        coord.wait()
        mib, secs = wait_vram(gpu, idle + 2 if isinstance(idle, int) else 0, 10)
        log("vram", phase=f"reload {i + 1}", mib=mib, back_to_idle_secs=secs, idle=idle, node=pool())
    # (3) soak: 200 requests, sequential and 8-way concurrent, after warm-up
    coord, url = spawn(coord_args(a, [naddr]), "coord")
    url = f"http://{url}"
    for _ in range(8):
        completion(url, "warm up the soak", 32)
    before = vram_mib(gpu)
    n = 0
    t = time.time()
    errors = 0
    while n < (40 if quick else 200):
        if (n // 20) % 2 == 0:
            try:
                completion(url, f"Request {n}: tell me about number {n}.", 8 + (n * 7) % 64, ignore_eos=True)
            except Exception:  # noqa: BLE001
                errors += 1
            n += 1
        else:
            ts = [threading.Thread(target=completion, args=(url, f"Concurrent {n + k}", 8 + (k * 13) % 64, True))
                  for k in range(8)]
            [x.start() for x in ts]
            [x.join() for x in ts]
            n += 8
    time.sleep(1)
    after = vram_mib(gpu)
    log("vram", phase="soak", requests=n, errors=errors, secs=round(time.time() - t, 1),
        before_mib=before, after_mib=after, inside=cluster_memory(url), node=pool())
    # (4) restart the node 10 times under the same coordinator; it re-attaches
    port = naddr.rsplit(":", 1)[1]
    restarts = []
    for i in range(3 if quick else 10):
        node.send_signal(signal.SIGKILL)
        node.wait()
        node, _ = spawn(node_args(a, dev, f"127.0.0.1:{port}"), "node")
        ok = False
        t = time.time()
        while time.time() - t < 30:
            try:
                completion(url, "after restart", 8)
                ok = True
                break
            except Exception:  # noqa: BLE001
                time.sleep(0.3)
        restarts.append({"restart": i + 1, "served_again": ok, "secs": round(time.time() - t, 2),
                         "mib": vram_mib(gpu)})
    log("vram", phase="node restarts", restarts=restarts)
    coord.send_signal(signal.SIGKILL)
    node.send_signal(signal.SIGKILL)
    coord.wait()
    node.wait()
    time.sleep(1)
    log("vram", phase="all stopped", mib=vram_mib(gpu))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--quants", default="q4_0,q8_0", help="the synthetic 8B models' weight types")
    ap.add_argument("--skip", default="",
                    help="comma-separated: kernels,correctness,bench,memory,synth,profile,peer,multi")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    gpu = int(a.device.split(":")[1]) if ":" in a.device else None
    skip = set(filter(None, a.skip.split(",")))
    try:
        rc, out, _ = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"],
                         "nvidia-smi")
        log("machine", gpus=out.strip().splitlines()[1:])
    except OSError as e:
        log("machine", gpus=[], error=str(e))
    for name, f in [("kernels", lambda: kernels(a)),
                    ("correctness", lambda: correctness(a, a.device)),
                    ("bench", lambda: bench(a, a.device)),
                    ("memory", lambda: memory(a, a.device, gpu, a.quick)),
                    ("synth", lambda: synth_bench(a, a.device)),
                    ("peer", lambda: peer(a)),
                    ("multi", lambda: multi(a))]:
        if name in skip:
            continue
        t = time.time()
        try:
            f()
        except Exception as e:  # noqa: BLE001
            log("failed", step=name, error=repr(e))
        log("step", step=name, secs=round(time.time() - t, 1))


if __name__ == "__main__":
    sys.exit(main())
