"""Where a `nudgefast bench` result came from (git, device) and how it is shown (table, plot)."""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUDGEFAST_NATIVE", "TRITON_INTERPRET",  # recorded with the command
            "NUDGEFAST_BLOCK_KERNEL", "NUDGEFAST_LLAMACPP_EXTRA_BUFTS")


# ---- Environment, output -------------------------------------------------------------------------
def git_info() -> dict:
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *a], capture_output=True, text=True, check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain").strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def device_info(device) -> dict:
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"type": device.type, "torch": torch.__version__, "triton": triton_version,
            "torch_threads": torch.get_num_threads(), "env": {k: os.environ.get(k) for k in ENV_KEYS},
            "host": platform.node()}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        info.update(name=f"{name} ({os.cpu_count()} logical CPUs)", cpu=cpu_details())
    return info


# the CPU flags the native kernels (block_linear) and llama.cpp choose their code paths by
SIMD_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_details() -> dict:
    """The CPU's SIMD flags and the block_linear kernels nudgefast chose on it."""
    flags: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    from ..blocks import kernel_info

    return {"simd_flags": [f for f in SIMD_FLAGS if f in flags], "block_kernels": kernel_info()}


def format_table(scenarios: list[dict]) -> str:
    head = ["engine", "case", "tok/s", "tok/s/seq", "p50 ms", "p90 ms", "p99 ms", "TTFT ms", "syncs/tok",
            "nudged", "accept", "bound", "check", "speedup", "(cpu time)"]
    rows = [head]

    def f(v, spec="{:.1f}"):
        return "-" if v is None else spec.format(v)
    for s in scenarios:
        acc = (s.get("acceptance") or {}).get("acceptance_rate")
        chk = s.get("anchor_check")
        cmp_ = s.get("comparison")
        rows.append([s["engine"], s["case"], f(s["tokens_per_s_aggregate"]), f(s["tokens_per_s_per_seq"]),
                     f(s["ms_per_token"]["p50"], "{:.2f}"), f(s["ms_per_token"]["p90"], "{:.2f}"),
                     f(s["ms_per_token"]["p99"], "{:.2f}"), f(s["ttft_ms"]), f(s["host_syncs_per_token"], "{:.3f}"),
                     f(s["nudged_fraction"], "{:.0%}"), f(acc, "{:.0%}"), f(s.get("fraction_of_bound"), "{:.0%}"),
                     "-" if chk is None else ("equal" if chk["equal"] else "DIFF"),
                     "-" if cmp_ is None else f"{cmp_['speedup_ratio_of_medians']:.2f}x",
                     "-" if not (cmp_ or {}).get("speedup_cpu_time") else f"{cmp_['speedup_cpu_time']:.2f}x"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def write_plot(result: dict, path: Path) -> bool:
    """tokens/s against batch size, and a histogram of per-token latency at batch 1. False when
    matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {}
    for s in result["scenarios"]:
        key = s["name"].rsplit("-b", 1)[0]
        series.setdefault(key, []).append((s["batch"], s["tokens_per_s_aggregate"]))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("tokens/s (aggregate)")
    ax1.set_xscale("log", base=2)
    ax1.legend(fontsize=7)
    for s in result["scenarios"]:
        if s["batch"] == 1 and s.get("_latencies_ms"):
            ax2.hist(s["_latencies_ms"], bins=40, histtype="step", label=s["name"])
    ax2.set_xlabel("ms per token (batch 1)")
    ax2.set_ylabel("tokens")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{result['device']['name']} - {result['models']['source']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
