"""Speed of every block_linear kernel this CPU runs, side by side (csrc/block_linear.cpp).

    .venv/bin/python benchmarks/block_kernels.py [--threads 1,2] [--rounds 5] [--out FILE.json]

Each kernel is forced with NUDGEFAST_BLOCK_KERNEL in its own child process (the choice is made once
per process); the children run one after another, round after round, so a noisy neighbour slows
every kernel alike. Reported: weights per second (N * K * M / time, median over rounds) of the
exact op and of the 8-bit-activation op (block_linear_q8), on SmolLM2-135M's linear shapes (Q4_1
linears, Q8_0 head) and gemma-3-270m's (Q4_K linears as 4-bit, Q6_K as 8-bit block 16). On a shared
machine compare kernels within one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# (name, N, K, bits, block)
SHAPES = [("smollm2 qkv", 960, 576, 4, 32), ("smollm2 gate_up", 3072, 576, 4, 32), ("smollm2 down", 576, 1536, 4, 32),
          ("smollm2 head", 49152, 576, 8, 32), ("gemma qkv", 1536, 640, 4, 32), ("gemma gate_up", 4096, 640, 4, 32),
          ("gemma down", 640, 2048, 8, 16), ("gemma head", 262144, 640, 8, 32)]

CHILD = r"""
import json, sys, time, torch, nudgefast._C
torch.set_num_threads(int(sys.argv[1]))
shapes, ms, reps = json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
out = {}
for name, n, k, bits, block in shapes:
    g = torch.Generator().manual_seed(0)
    codes = (torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8) if bits == 4 else
             torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8))
    scale, offset = torch.rand(n, k // block, generator=g) * 0.01, torch.randn(n, k // block, generator=g) * 0.01
    for m in ms:
        x = torch.randn(m, k, generator=g)
        for op_name in ("block_linear", "block_linear_q8"):
            op = getattr(torch.ops.nudgefast, op_name)
            op(x, codes, scale, offset, bits, block)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(reps):
                    op(x, codes, scale, offset, bits, block)
                best = min(best, (time.perf_counter() - t0) / reps)
            out[f"{name}|{m}|{op_name}"] = n * k * m / best
print(json.dumps({"kernels": torch.ops.nudgefast.block_kernels(), "rates": out}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--m", default="1,5", help="rows of x (1: decode; 5: a K=4 verification)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import torch
    import nudgefast._C  # noqa: F401

    available = [k for k in torch.ops.nudgefast.block_kernels()[2:] if k != "avx512vnni"]
    ms = [int(m) for m in args.m.split(",")]
    rates: dict = {}
    kernels_seen = {}
    for _ in range(args.rounds):
        for threads in [int(t) for t in args.threads.split(",")]:
            for kernel in available:
                env = {**os.environ, "NUDGEFAST_BLOCK_KERNEL": kernel, "OMP_NUM_THREADS": str(threads)}
                res = subprocess.run([sys.executable, "-c", CHILD, str(threads), json.dumps(SHAPES), json.dumps(ms),
                                      str(args.reps)], env=env, capture_output=True, text=True, check=True)
                data = json.loads(res.stdout)
                kernels_seen[kernel] = data["kernels"][:2]
                for key, rate in data["rates"].items():
                    rates.setdefault((kernel, threads, key), []).append(rate)
    rows = []
    for (kernel, threads, key), values in sorted(rates.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        name, m, op = key.split("|")
        q8 = op == "block_linear_q8"
        rows.append({"shape": name, "m": int(m), "threads": threads, "op": op,
                     "kernel": kernels_seen[kernel][1 if q8 else 0].split(":", 1)[1],
                     "forced": kernel, "gweights_per_s": statistics.median(values) / 1e9})
    print(f"{'shape':16} {'M':>2} {'thr':>3} {'op':16} {'kernel':12} {'G weights/s':>11}")
    for r in rows:
        if r["op"] == "block_linear_q8" and r["forced"] != r["kernel"] and r["kernel"] == "portable" and \
                r["forced"] != "portable":
            continue  # the same portable q8 kernel again
        print(f"{r['shape']:16} {r['m']:>2} {r['threads']:>3} {r['op']:16} {r['kernel']:12} {r['gweights_per_s']:11.2f}")
    if args.out:
        from pathlib import Path

        from nudgefast.bench.report import device_info, git_info
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"command": "benchmarks/block_kernels.py " + " ".join(argv or sys.argv[1:]), "git": git_info(),
                       "device": device_info("cpu"), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
