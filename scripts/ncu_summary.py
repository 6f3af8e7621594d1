#!/usr/bin/env python3
"""Time per kernel from an ncu CSV (`ncu --metrics gpu__time_duration.sum --csv`), the 18 costliest.

  python3 scripts/ncu_summary.py OUT/ncu.csv
"""
import csv, io, sys
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
per = {}
for r in csv.DictReader(io.StringIO("".join(rows))):
    try:
        v = float(r.get("Metric Value", "0").replace(",", ""))
    except ValueError:
        continue
    ns = v * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6}.get(r.get("Metric Unit", ""), 1)
    name = r.get("Kernel Name", "?")[:100]
    c, t = per.get(name, (0, 0.0))
    per[name] = (c + 1, t + ns)
tot = sum(t for _, t in per.values())
print(f"under ncu: {sum(c for c, _ in per.values())} kernels, {tot/1e6:.1f} ms")
for k, (c, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:18]:
    print(f"  {t/1e6:8.2f} ms {c:6d}x  {k}")
