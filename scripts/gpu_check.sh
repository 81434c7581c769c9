#!/usr/bin/env bash
# One command for a fresh machine with one NVIDIA GPU (H100 / H200) whose image already has torch
# and triton: install, GPU tests, the OLMo-2-7B + 1B random-weight benchmark, results, summary.
#
#   bash scripts/gpu_check.sh            # everything, within ~10 minutes
#   bash scripts/gpu_check.sh --dry-run  # print the commands, run nothing (works without a GPU)
#
# Budget (each step has its own `timeout`, so a hang in one step cannot eat the others' time):
#   install 60 s, pytest -m gpu 180 s, benchmark 330 s, results + summary seconds.
# Without a GPU it says so and exits 2 at once (before installing anything).
# Writes benchmarks/results/<device>-olmo2-7b+1b.json (device, command, commit inside) and
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
T_TESTS=${T_TESTS:-180}
T_BENCH=${T_BENCH:-330}
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
RESULT="benchmarks/results/${DEVICE}-olmo2-7b+1b.json"
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

# ---- 3. GPU tests --------------------------------------------------------------------------------
# -p no:cacheprovider: a read-only checkout must not fail the run.
run "$T_TESTS" "pytest -m gpu" "$PY" -m pytest -q -m gpu -p no:cacheprovider
TESTS_RC=$?

# ---- 4. benchmark: OLMo-2-7B base + OLMo-2-1B nudger, random planted weights, bf16 ---------------
# base-only, nudging (word level), speculative nudging K=4 at batch 1, 8, 32; the transformers
# anchors (generate, and the nudging loop) at batch 1. 128 new tokens and 3 timed repeats keep the
# whole step within its budget (the anchors at batch 1 are the slow part).
run "$T_BENCH" benchmark "$PY" -m nudgefast.bench --preset olmo2-7b+1b --device cuda --dtype bfloat16 \
  --batch 1,8,32 --mode base_only,nudging --granularity word --speculate 0,4 \
  --prompt-len 128 --new-tokens 128 --warmup 1 --repeats 3 --anchors --out "$RESULT"
BENCH_RC=$?

# ---- 5. results table ----------------------------------------------------------------------------
run 60 "RESULTS.md" "$PY" benchmarks/make_results_md.py

# ---- 6. summary ----------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  echo "+ [summary] $PY - <<EOF (prints device, commit and every scenario of $RESULT)"
  exit 0
fi
echo
echo "================ gpu_check summary ($(( $(date +%s) - START ))s) ================"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo -dirty)"
for s in "${STATUS[@]}"; do echo "  $s"; done
if [ -f "$RESULT" ]; then
  "$PY" - "$RESULT" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"device: {d['device'].get('name')}  torch {d['device'].get('torch')}  triton {d['device'].get('triton')}")
print(f"copy bandwidth: {d.get('copy_bandwidth_gbps') or 0:.0f} GB/s   command: {d['command']}")
print(f"{'engine':10s} {'case':42s} {'tok/s':>9s} {'tok/s/seq':>9s} {'bound':>6s} {'speed-up':>9s} same")
for s in d["scenarios"]:
    c = s.get("comparison") or {}
    sp = c.get("speedup_ratio_of_medians")
    b = s.get("fraction_of_bound")
    print(f"{s['engine'][:10]:10s} {s['case'][:42]:42s} {s['tokens_per_s_aggregate']:9.1f} "
          f"{s['tokens_per_s_per_seq']:9.1f} {'-' if b is None else f'{b:.0%}':>6s} "
          f"{'-' if sp is None else f'{sp:.2f}x':>9s} {'' if not c else ('yes' if c.get('equal_work') else 'NO')}")
print("(speed-up: nudgefast over this anchor, ratio of medians; 'bound': fraction of the bandwidth bound)")
EOF
else
  echo "no result file ($RESULT): the benchmark failed; see $LOG"
fi
echo "results: $RESULT, benchmarks/RESULTS.md; log: $LOG"
[ "$INSTALL_RC" = 0 ] && [ "$BENCH_RC" = 0 ] && [ "$TESTS_RC" = 0 ]
