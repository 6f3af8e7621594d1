#!/usr/bin/env python3
"""Time per kernel from an ncu CSV (`ncu --metrics gpu__time_duration.sum --csv`), the 18 costliest.
With --means, every metric of the CSV averaged per kernel instead (for CSVs of several
metrics, such as achieved bandwidth and occupancy).

  python3 scripts/ncu_summary.py OUT/ncu.csv
  python3 scripts/ncu_summary.py --means OUT/ncu-attention.csv
"""
import csv, io, sys
means = "--means" in sys.argv[1:]
path = [a for a in sys.argv[1:] if a != "--means"][0]
rows = [l for l in open(path) if l.startswith('"')]
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
