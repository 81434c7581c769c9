#!/usr/bin/env bash
# One command for a fresh machine with one NVIDIA GPU (H100 / H200) whose image already has torch
# and triton: install, GPU tests, the OLMo-2-7B + 1B random-weight benchmark, results, summary.
#
#   bash scripts/gpu_check.sh            # everything, within ~10 minutes
#   bash scripts/gpu_check.sh --dry-run  # print the commands, run nothing (works without a GPU)
#
# Budget (each step has its own `timeout`, so a hang in one step cannot eat the others' time):
#   install 60 s (+ 60 s for missing light dependencies), pytest -m gpu 150 s, benchmark 200 s
#   (batch 1 + anchors) + 110 s (batch 8, 32), results + summary seconds: under 10 minutes.
# Without a GPU it says so and exits 2 at once (before installing anything).
# Writes benchmarks/results/<device>-olmo2-7b+1b-batch*.json (device, command, commit inside) and
# regenerates benchmarks/RESULTS.md; logs go to benchmarks/results/<device>-gpu-check.log.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run|-n) DRY=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run)" >&2; exit 64 ;;
  esac
done

PY=${PYTHON:-python3}
T_INSTALL=${T_INSTALL:-60}
T_TESTS=${T_TESTS:-150}
T_BENCH1=${T_BENCH1:-200}
T_BENCH2=${T_BENCH2:-110}
START=$(date +%s)

# ---- 1. a GPU or nothing ------------------------------------------------------------------------
if [ "$DRY" = 0 ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check.sh: no NVIDIA GPU on this machine (nvidia-smi finds none); nothing to check." >&2
    exit 2
  fi
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: nvidia-smi sees a GPU but torch.cuda.is_available() is False (no CUDA torch in $PY)." >&2
    exit 2
  fi
  DEVICE=$("$PY" -c "import re, torch; n = torch.cuda.get_device_name(0); m = re.search(r'([A-Z]\d{2,4}[A-Za-z]*)', n); print((m.group(1) if m else n).lower().replace(' ', '-'))")
else
  DEVICE=${DEVICE:-h100}
fi
RESULT1="benchmarks/results/${DEVICE}-olmo2-7b+1b-batch1.json"
RESULT2="benchmarks/results/${DEVICE}-olmo2-7b+1b-batch8-32.json"
LOG="benchmarks/results/${DEVICE}-gpu-check.log"

run() {  # run LIMIT_S DESCRIPTION CMD...: print, time-limit, log; remember the status
  local limit=$1 what=$2; shift 2
  echo "+ [$what, limit ${limit}s] $*"
  if [ "$DRY" = 1 ]; then return 0; fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "  -> $what: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
  STATUS+=("$what: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)')")
  return "$rc"
}
STATUS=()
[ "$DRY" = 1 ] || { mkdir -p benchmarks/results; : > "$LOG"; }

# ---- 2. install (the image's torch and triton are kept: no deps, no build isolation) -----------
run "$T_INSTALL" install "$PY" -m pip install -q -e . --no-deps --no-build-isolation
INSTALL_RC=$?

# What --no-deps did not install: the package's own light dependencies, pytest for the tests and
# transformers for the anchors. Missing ones are installed when an index is reachable (60 s at most);
# without transformers the benchmark runs without anchors, without pytest the tests are skipped.
MISSING=$("$PY" -c "
import importlib.util
mods = ['safetensors', 'tokenizers', 'jinja2', 'numpy', 'pytest', 'transformers', 'accelerate']
print(' '.join(m for m in mods if importlib.util.find_spec(m) is None))
" 2>/dev/null)
if [ -n "$MISSING" ]; then
  run 60 "install missing: $MISSING" "$PY" -m pip install -q $MISSING || true
fi
have() { [ "$DRY" = 1 ] || "$PY" -c "import $1" >/dev/null 2>&1; }
ANCHORS=--anchors
have transformers || { ANCHORS=; STATUS+=("anchors: SKIPPED (transformers is not installed)"); }

# ---- 3. GPU tests --------------------------------------------------------------------------------
# -p no:cacheprovider: a read-only checkout must not fail the run.
TESTS_RC=0
if have pytest; then
  run "$T_TESTS" "pytest -m gpu" "$PY" -m pytest -q -m gpu -p no:cacheprovider
  TESTS_RC=$?
else
  STATUS+=("pytest -m gpu: SKIPPED (pytest is not installed)"); TESTS_RC=1
fi

# ---- 4. benchmark: OLMo-2-7B base + OLMo-2-1B nudger, random planted weights, bf16 ---------------
# base-only, nudging (word level), speculative nudging K=4; batch 1 with the transformers anchors
# (generate and the nudging loop: the slow part), then batch 8 and 32. Two runs, two result files:
# a run that hits its time limit loses only its own file. 128 new tokens, 3 timed repeats.
BENCH=("$PY" -m nudgefast.bench --preset olmo2-7b+1b --device cuda --dtype bfloat16 --mode base_only,nudging
       --granularity word --speculate 0,4 --prompt-len 128 --new-tokens 128 --warmup 1 --repeats 3)
run "$T_BENCH1" "benchmark batch 1" "${BENCH[@]}" --batch 1 $ANCHORS --out "$RESULT1"
BENCH_RC=$?
run "$T_BENCH2" "benchmark batch 8, 32" "${BENCH[@]}" --batch 8,32 --out "$RESULT2"
BENCH_RC=$(( BENCH_RC | $? ))

# ---- 5. results table ----------------------------------------------------------------------------
run 60 "RESULTS.md" "$PY" benchmarks/make_results_md.py

# ---- 6. summary ----------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  echo "+ [summary] $PY - $RESULT1 $RESULT2 (prints device, commit and every scenario)"
  exit 0
fi
echo
echo "================ gpu_check summary ($(( $(date +%s) - START ))s) ================"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)"
for s in "${STATUS[@]}"; do echo "  $s"; done
"$PY" - "$RESULT1" "$RESULT2" <<'EOF'
import json, os, sys
for path in sys.argv[1:]:
    if not os.path.exists(path):
        print(f"no result file {path}: that benchmark run failed or timed out (see the log)")
        continue
    d = json.load(open(path))
    print(f"\n{path}: {d['device'].get('name')}  torch {d['device'].get('torch')}  triton {d['device'].get('triton')}"
          f"  copy bandwidth {d.get('copy_bandwidth_gbps') or 0:.0f} GB/s")
    print(f"  command: {d['command']}")
    print(f"  {'engine':18s} {'case':44s} {'tok/s':>9s} {'tok/s/seq':>9s} {'bound':>6s} {'ours/anchor':>11s} same")
    for s in d["scenarios"]:
        c = s.get("comparison") or {}
        sp, b = c.get("speedup_ratio_of_medians"), s.get("fraction_of_bound")
        print(f"  {s['engine'][:18]:18s} {s['case'][:44]:44s} {s['tokens_per_s_aggregate']:9.1f} "
              f"{s['tokens_per_s_per_seq']:9.1f} {'-' if b is None else f'{b:.0%}':>6s} "
              f"{'-' if sp is None else f'{sp:.2f}x':>11s} {'' if not c else ('yes' if c.get('equal_work') else 'NO')}")
print("(ours/anchor: nudgefast tok/s over that anchor's, ratio of medians; bound: fraction of the bandwidth bound)")
EOF
echo "results: $RESULT1 $RESULT2 benchmarks/RESULTS.md; log: $LOG"
[ "$INSTALL_RC" = 0 ] && [ "$BENCH_RC" = 0 ] && [ "$TESTS_RC" = 0 ]
