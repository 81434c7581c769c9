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
        # results written by earlier runs (benchmarks/results/) are outputs, not a change to the code
        dirty = bool(git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results").strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def environment_info() -> dict:
    """Versions of what ran: Python and the packages whose code is timed or compared against."""
    return {"python": platform.python_version(), "python_implementation": platform.python_implementation(),
            "torch": torch.__version__, "transformers": _version("transformers"), "triton": _version("triton"),
            "numpy": _version("numpy"), "gguf": _version("gguf"), "nudgefast": _version("nudgefast"),
            "os": f"{platform.system()} {platform.release()}", "machine": platform.machine()}


def cpu_info() -> dict:
    """The CPU as /proc/cpuinfo states it: the model name (which virtual machines often mask, e.g.
    "Intel Xeon Processor"), so also vendor, family / model / stepping numbers and the ISA flags."""
    info = {"model_name": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count()}
    keys = {"model name": "model_name", "vendor_id": "vendor", "cpu family": "family", "model": "model",
            "stepping": "stepping", "microcode": "microcode", "cache size": "cache_size", "flags": "flags"}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in keys and keys[key] not in info.get("_seen", set()):
                info.setdefault("_seen", set()).add(keys[key])
                info[keys[key]] = " ".join(value.split()) if key == "flags" else value.strip()
            if not line.strip() and "_seen" in info:
                break  # the first processor's block is enough
    info.pop("_seen", None)
    with contextlib.suppress(OSError):
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    return info


def device_info(device) -> dict:
    device = torch.device(device)
    info = {"type": device.type, "torch": torch.__version__, "triton": _version("triton"),
            "torch_threads": torch.get_num_threads(), "env": {k: os.environ.get(k) for k in ENV_KEYS}}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        cpu = cpu_info()
        cpu.update(cpu_details())
        info.update(name=f"{cpu['model_name']} ({cpu['logical_cpus']} logical CPUs)", cpu=cpu)
    return info


def native_kernel_isa() -> dict | None:
    """{kernel: instruction set} of the C++ CPU ops on this CPU (None when they are not built, or
    were built before they could say)."""
    from ..ops import native_ops_available

    if not native_ops_available():
        return None
    try:
        text = torch.ops.nudgefast.kernel_isa()
    except (AttributeError, RuntimeError):
        return {"unknown": "the built extension predates kernel_isa; rebuild it"}
    return dict(part.split("=", 1) for part in text.split(";"))


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
    head = ["engine", "case", "reads", "tok/s", "p50 ms", "p90 ms", "TTFT ms", "syncs/tok", "nudged", "accept",
            "bound", "tokens", "speed-up over this anchor (per nudgefast engine)"]
    rows = [head]

    def f(v, spec="{:.1f}"):
        return "-" if v is None else spec.format(v)
    for s in scenarios:
        acc = (s.get("acceptance") or {}).get("acceptance_rate")
        speedups = "; ".join(f"{c['ours']}: " + (f"{c['speedup_ratio_of_medians']:.2f}x" if c["speedup_ratio_of_medians"]
                                                 else "suppressed")
                             for c in s.get("comparisons") or [])
        rows.append([s["engine"], s["case"], s["weights_read"], f(s["tokens_per_s_aggregate"]),
                     f(s["ms_per_token"]["p50"], "{:.2f}"), f(s["ms_per_token"]["p90"], "{:.2f}"), f(s["ttft_ms"]),
                     f(s["host_syncs_per_token"], "{:.3f}"), f(s["nudged_fraction"], "{:.0%}"), f(acc, "{:.0%}"),
                     f(s.get("fraction_of_bound"), "{:.0%}"), "same" if s["same_tokens"] else "DIFFER",
                     speedups or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i in (0, 1, 2, 12) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def write_plot(result: dict, path: Path) -> None:
    """Left: tokens/s of every engine per case (bars; with several batch sizes, against the batch
    size). Right: histogram of per-token latency at batch 1. matplotlib is checked for before the
    run (nudgefast bench --plot)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    scenarios = result["scenarios"]
    batches = sorted({s["batch"] for s in scenarios})
    if len(batches) > 1:
        series = {}
        for s in scenarios:
            series.setdefault(s["name"].rsplit("-b", 1)[0], []).append((s["batch"], s["tokens_per_s_aggregate"]))
        for key, pts in sorted(series.items()):
            pts.sort()
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax1.set_xlabel("batch size")
        ax1.set_xscale("log", base=2)
    else:
        cases = list(dict.fromkeys(s["case"] for s in scenarios))
        engines = list(dict.fromkeys(s["engine"] for s in scenarios))
        width = 0.8 / max(1, len(engines))
        for j, engine in enumerate(engines):
            xs, ys = [], []
            for i, case in enumerate(cases):
                s = next((s for s in scenarios if s["case"] == case and s["engine"] == engine), None)
                if s is not None:
                    xs.append(i + (j - (len(engines) - 1) / 2) * width)
                    ys.append(s["tokens_per_s_aggregate"])
            label = f"{engine} ({next(s['weights_read'] for s in scenarios if s['engine'] == engine)})"
            ax1.bar(xs, ys, width, label=label)
        ax1.set_xticks(range(len(cases)))
        ax1.set_xticklabels(cases, rotation=15, fontsize=7)
    ax1.set_ylabel("tokens/s (median of the timed runs)")
    ax1.legend(fontsize=7)
    for s in scenarios:
        if s["batch"] == 1 and s.get("_latencies_ms"):
            ax2.hist(s["_latencies_ms"], bins=40, histtype="step", label=s["name"])
    ax2.set_xlabel("ms per token (batch 1)")
    ax2.set_ylabel("tokens")
    ax2.legend(fontsize=6)
    git = result.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + ("-dirty" if git.get("dirty") else "")
    fig.suptitle(f"{result['device']['name']} - {result['models']['source']} - {commit} "
                 "(ratios within one run are what counts; a shared machine)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
