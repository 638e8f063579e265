#!/usr/bin/env bash
# One prepared GPU check of tensoradapt (issue 20), for a machine with one CUDA GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # OUT_DIR: default $OUT, else benchmarks/results/gpu_check
#
# Steps, each under its own timeout and all under one time budget (GPU_CHECK_BUDGET_S, default
# 470 s: the whole script ends in under 8 minutes).  A step that fails, times out or no longer
# fits is recorded with the reason and the script goes on.
#
#   info               nvidia-smi, torch.cuda
#   deps               `gpu_check.py ensure-deps`: the modules tensoradapt and its tests import
#                      (array-api-compat, array-api-strict, tensorly, ...) and CuPy for
#                      torch.version.cuda (cupy-cudaXXx), each installed only if it does not import,
#                      from the wheel folder GPU_CHECK_WHEELS (default .whl) and then from the index
#                      with short timeouts (offline: fails in seconds, recorded); then tensoradapt
#                      itself (editable install of this checkout, offline) if it does not import
#   pytest-gpu         python -m pytest -m gpu -k "not torch_cuda" tests   (CuPy backend, CUDA tests)
#   pytest-torch-cuda  python -m pytest -m gpu -k torch_cuda tests         (the backend-parametrised
#                      CPU suite with torch CUDA tensors; "no_tests" until tests/conftest.py has the
#                      torch_cuda backend, see docs/benchmarks.md "GPU check (issue 20)")
#   bench              python benchmarks/gpu_check.py --out OUT_DIR/gpu_check.json (FWHT, train steps
#                      against PEFT LoRA, ΔW generation memory), with what is left of the budget
#
# Files in OUT_DIR: gpu_check.json (everything, the steps included), gpu_check.log (all output),
# gpu_check_steps.jsonl, pytest_gpu.xml, pytest_torch_cuda.xml.  Exit status 0 when every step
# passed or was skipped, 1 otherwise.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (470), GPU_CHECK_BENCH_MIN_S (200:
# seconds the earlier steps leave to bench), GPU_CHECK_DEVICE (cuda), GPU_CHECK_SMOKE (1: tiny
# sizes), GPU_CHECK_SECTIONS (bench sections, comma-separated), GPU_CHECK_WHEELS (.whl),
# GPU_CHECK_SITE (/tmp/gpu_check_site: pip --target, put on PYTHONPATH), GPU_CHECK_SKIP
# (comma-separated step names to skip).  On a CPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_SMOKE=1.

set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 2
cd "$ROOT" || exit 2
OUT_DIR=${1:-${OUT:-$ROOT/benchmarks/results/gpu_check}}
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
BENCH_MIN_S=${GPU_CHECK_BENCH_MIN_S:-200}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SMOKE=${GPU_CHECK_SMOKE:-0}
SECTIONS=${GPU_CHECK_SECTIONS:-}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
SKIP=",${GPU_CHECK_SKIP:-},"
CHECK=$ROOT/benchmarks/gpu_check.py
STEPS=$OUT_DIR/gpu_check_steps.jsonl
JSON=$OUT_DIR/gpu_check.json
LOG=$OUT_DIR/gpu_check.log
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
FAILED=0
LAST_STATUS=

# Seconds left of the budget (may be negative).
left() { echo $(( BUDGET_S - (SECONDS - START) )); }

# record NAME STATUS RC SECONDS [DETAIL] [options of `gpu_check.py record-step`]
record() {
  "$PY" "$CHECK" record-step "$STEPS" "$@" || {
    echo "record-step failed for $1" >&2
    printf '{"name": "%s", "status": "error", "rc": null, "seconds": 0, "detail": "record-step failed"}\n' \
      "$1" >>"$STEPS"
  }
}

# step NAME CAP_S KEEP_S [record-step options] -- COMMAND...
# Runs COMMAND under `timeout` for at most CAP_S seconds, leaving KEEP_S seconds of the budget to
# the steps after it; skipped (and recorded so) when GPU_CHECK_SKIP names it or fewer than 5 s fit.
step() {
  local name=$1 cap=$2 keep=$3
  shift 3
  local extra=()
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do extra+=("$1"); shift; done
  shift
  if [[ $SKIP == *",$name,"* ]]; then
    echo "== $name: skipped (GPU_CHECK_SKIP)"
    LAST_STATUS=skipped
    record "$name" skipped 0 0 "GPU_CHECK_SKIP names it"
    return 0
  fi
  local limit=$cap avail
  avail=$(( $(left) - keep ))
  (( avail < limit )) && limit=$avail
  if (( limit < 5 )); then
    echo "== $name: skipped (time budget)"
    LAST_STATUS=skipped
    record "$name" skipped 0 0 "time budget: $(left) s left of ${BUDGET_S} s, ${keep} s kept for the steps after it"
    return 0
  fi
  echo "== $name (limit ${limit} s, $(left) s of the budget left): $*"
  local tail t0 rc status
  tail=$(mktemp)
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$tail"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=error ;;
  esac
  if [[ $name == pytest-* ]]; then
    case $rc in
      1) status=failed ;;
      5) status=no_tests ;;
    esac
  fi
  [[ $status == ok || $status == no_tests ]] || FAILED=1
  LAST_STATUS=$status
  echo "== $name: $status (exit $rc, $(( SECONDS - t0 )) s)"
  record "$name" "$status" "$rc" "$(( SECONDS - t0 ))" "" --tail-file "$tail" ${extra[@]+"${extra[@]}"}
  rm -f "$tail"
}

main() {
  : >"$STEPS"
  echo "gpu_check.sh: out $OUT_DIR, python $PY, device $DEVICE, budget ${BUDGET_S} s, $(date -u +%FT%TZ)"

  local probe='import torch; c = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", c); print(torch.cuda.get_device_properties(0) if c else "no CUDA device")'
  step info 20 "$BENCH_MIN_S" -- bash -c \
    'if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not on PATH"; fi; "$0" -c "$1"' \
    "$PY" "$probe"

  local deps_json cupy_flag=()
  deps_json=$(mktemp)
  [ "$DEVICE" = cpu ] && cupy_flag=(--no-cupy)
  step deps 120 "$BENCH_MIN_S" --result-json "$deps_json" -- \
    "$PY" "$CHECK" ensure-deps --wheels "$WHEELS" --site "$SITE" --result "$deps_json" ${cupy_flag[@]+"${cupy_flag[@]}"}
  rm -f "$deps_json"

  local pytest=("$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors -rfE)
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then pytest+=(--timeout 90); fi
  step pytest-gpu 150 "$BENCH_MIN_S" --junit "$OUT_DIR/pytest_gpu.xml" -- \
    "${pytest[@]}" -k "not torch_cuda" --junitxml "$OUT_DIR/pytest_gpu.xml" tests
  step pytest-torch-cuda 60 "$BENCH_MIN_S" --junit "$OUT_DIR/pytest_torch_cuda.xml" -- \
    "${pytest[@]}" -k torch_cuda --junitxml "$OUT_DIR/pytest_torch_cuda.xml" tests

  local budget bench
  budget=$(( $(left) - 15 ))
  (( budget < 0 )) && budget=0
  bench=("$PY" "$CHECK" --out "$JSON" --device "$DEVICE" --steps-file "$STEPS" --budget "$budget")
  [ "$SMOKE" = 1 ] && bench+=(--smoke)
  [ -n "$SECTIONS" ] && bench+=(--sections "$SECTIONS")
  rm -f "$JSON"
  step bench "$(left)" 0 -- "${bench[@]}"

  # The steps (bench's own included) into the one JSON file; made if bench wrote none.
  "$PY" "$CHECK" merge-steps --json "$JSON" --steps "$STEPS" --reason "bench step: $LAST_STATUS" || FAILED=1
  echo "gpu_check.sh: done in $(( SECONDS - START )) s; JSON: $JSON"
  "$PY" - "$STEPS" "$ROOT/benchmarks" <<'EOF' || true
import sys
sys.path.insert(0, sys.argv[2])
from gpu_check import read_steps
for s in read_steps(sys.argv[1]):
    tests = s.get("tests") or {}
    counts = " ".join(f"{k}={tests[k]}" for k in ("passed", "failures", "errors", "skipped") if k in tests)
    print(f"  {s['name']:<18} {s['status']:<9} {s.get('seconds', 0):>5} s  {counts}{s.get('detail', '')[:120]}")
EOF
  return "$FAILED"
}

main "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
