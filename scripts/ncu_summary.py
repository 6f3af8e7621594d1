#!/usr/bin/env python3
"""Time per kernel from an ncu CSV (`ncu --metrics gpu__time_duration.sum --csv`), the 18 costliest.
With --means, every metric of the CSV averaged per kernel instead (for CSVs of several
metrics, such as achieved bandwidth and occupancy). Also reads nsys's per-kernel sums
(`nsys stats --report cuda_gpu_kern_sum --format csv`), measured at the GPU's own clocks and
without serializing, where ncu locks the clocks at base.

  python3 scripts/ncu_summary.py OUT/ncu.csv
  python3 scripts/ncu_summary.py --means OUT/ncu-attention.csv
  python3 scripts/ncu_summary.py OUT/x_cuda_gpu_kern_sum.csv    (or x_cuda_api_sum.csv)
"""
import csv, io, re, sys
means = "--means" in sys.argv[1:]
path = [a for a in sys.argv[1:] if a != "--means"][0]
lines = open(path).read().splitlines(keepends=True)
head = next((i for i, l in enumerate(lines) if "Total Time (ns)" in l), None)
if head is not None:
    # nsys: one row a kernel, its total and its count; names shortened to the function and
    # its first template argument
    def strip_args(name):
        """the name without its trailing argument list"""
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                return name[:i] if name.endswith(")") else name
        return name
    per = {}
    for r in csv.DictReader(io.StringIO("".join(lines[head:]))):
        name = r.get("Name", "?")
        short = re.sub(r"^void ", "", strip_args(name))[:80]
        c, t = per.get(short, (0, 0.0))
        n = r.get("Instances") or r.get("Num Calls") or "0"
        per[short] = (c + int(n.replace(",", "") or 0),
                      t + float(r.get("Total Time (ns)", "0").replace(",", "") or 0))
    tot = sum(t for _, t in per.values())
    what = "kernels" if "Instances" in lines[head] else "calls"
    print(f"under nsys: {sum(c for c, _ in per.values())} {what}, {tot/1e6:.1f} ms")
    for k, (c, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:18 if what == "kernels" else 8]:
        print(f"  {t/1e6:8.2f} ms {c:6d}x  {k}")
    sys.exit(0)
rows = [l for l in lines if l.startswith('"')]
per = {}
metrics = {}
for r in csv.DictReader(io.StringIO("".join(rows))):
    try:
        v = float(r.get("Metric Value", "0").replace(",", ""))
    except ValueError:
        continue
    name = r.get("Kernel Name", "?")[:100]
    if means:
        key = (name, r.get("Metric Name", "?"), r.get("Metric Unit", ""))
        c, t = metrics.get(key, (0, 0.0))
        metrics[key] = (c + 1, t + v)
        continue
    ns = v * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6}.get(r.get("Metric Unit", ""), 1)
    c, t = per.get(name, (0, 0.0))
    per[name] = (c + 1, t + ns)
if means:
    for (name, metric, unit), (c, t) in sorted(metrics.items()):
        print(f"  {name[:48]:48s} {metric:60s} {t / c:12.2f} {unit} ({c}x)")
    sys.exit(0)
tot = sum(t for _, t in per.values())
print(f"under ncu: {sum(c for c, _ in per.values())} kernels, {tot/1e6:.1f} ms")
for k, (c, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:18]:
    print(f"  {t/1e6:8.2f} ms {c:6d}x  {k}")
