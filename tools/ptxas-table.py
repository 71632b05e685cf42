#!/usr/bin/env python3
"""Prints the ptxas resource report of every kernel (registers, stack, spills, static shared
memory) as a Markdown table, from the reports build.rs writes ($OUT_DIR/<module>.ptxas.txt)
or gpu-bundle/ptxas/. Usage: tools/ptxas-table.py [DIR]  (default: newest release build)"""
import glob
import os
import re
import sys

if len(sys.argv) > 1:
    d = sys.argv[1]
else:
    outs = [os.path.dirname(p) for p in glob.glob("target/*/build/rln-engine-*/out/kernels.rs")]
    if not outs:
        sys.exit("no build output found; run cargo build first or pass a folder")
    d = max(outs, key=os.path.getmtime)
rows = []
for f in sorted(glob.glob(os.path.join(d, "*.ptxas.txt"))):
    mod = os.path.basename(f).split(".")[0]
    name = None
    for line in open(f):
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            stack, st, ld = m.groups()
        m = re.search(r"Used (\d+) registers(.*)", line)
        if m and name:
            smem = re.search(r"(\d+) bytes smem", m.group(2))
            rows.append((mod, name, int(m.group(1)), int(stack), int(st), int(ld), int(smem.group(1)) if smem else 0))
            name = None
print("| module | kernel | registers | stack B | spill st/ld B | static smem B |")
print("|---|---|---:|---:|---:|---:|")
for r in sorted(rows, key=lambda r: (r[0], r[1])):
    print(f"| {r[0]} | `{r[1]}` | {r[2]} | {r[3]} | {r[4]}/{r[5]} | {r[6]} |")
