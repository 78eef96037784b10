#!/usr/bin/env bash
# gpu_check.sh - checks the CUDA backend on a real GPU in one command and ends
# with a table of what passed.
#
#   bash tests/gpu_check.sh        # about 8 minutes (the default budget, 500 s)
#
# Run it from a checkout on a machine with an NVIDIA GPU (compute capability
# 8.0 or newer), the CUDA toolkit (nvcc) and python3 with a CUDA build of
# torch, transformers, numpy, tokenizers, safetensors and pytest. It needs no
# network and nothing prepared by hand: without scipy-openblas32 the build
# uses its builtin C GEMM, and tests that need gguf skip.
#
# What it does, in order:
#   env     the GPU, driver, nvcc and Python packages
#   build   the extension in place for sm_80/sm_90/sm_90a, warnings as errors,
#           with ptxas's registers and spills of every kernel
#   ops     the C op test in cuda mode: every CUDA op against its CPU op
#           (tests/backend_ops/), and the CUDA build checks
#   model   whole-model parity against HF transformers on the GPU, packing and
#           the device contract (tests/test_gpu_model.py)
#   family  Gemma-2, Gemma-3 and OLMo-2 parity on CUDA (tests/test_gpu_families.py)
#           and on the CPU (tests/test_arch_*.py)
#   parity  the user's own check, `rjepa-latent parity --device cuda`, bf16 and
#           fp32, on tiny models of each family
#   bench   the Qwen3-8B-shaped benchmark against HF (tests/gpu_bench.py)
# and last a summary: registers / spills, parity errors, benchmark, stages.
#
# Time: the run stays within GPU_CHECK_BUDGET seconds (default 500), so the
# summary always comes. Each stage runs under `timeout` with min(its cap, the
# time left after what is kept for the stages after it); a stage whose share
# is below the least it needs is not started and shows as SKIP in the table,
# with the reason, instead of failing for want of time. Cap / minimum in
# seconds: build 200 / 60, ops 120 / 40, model 200 / 60, family 150 / 40,
# parity 60 / 20 per run, bench the rest / 60 (--quick below 240 s left). The
# bench's checkpoint is written (or found in its cache) in the background while
# the extension builds and the op tests run (<= 200 s; the model tests wait
# for it: no other process may use the GPU while they measure its free
# memory). Knobs: GPU_CHECK_BUDGET=s, GPU_CHECK_QUICK=1 (quick bench),
# GPU_CHECK_SKIP_MODEL=1 (also skips the family and parity stages),
# GPU_CHECK_SKIP_BENCH=1, GPU_CHECK_EMULATED=1 (a dry run on the emulated CUDA
# device of a RJEPA_CUDA=emu build: no GPU needed, small test selections, no
# bench), PYTHON (default python3).
#
# Files under $OUT (default /tmp/rjepa_gpu_check): env.txt, build.log,
# ptxas.txt, ops.log, model.log (the family and parity runs appended),
# bench.log, gpu_bench.json, summary.txt. Exit status 0 when no stage failed and
# the op or model tests passed (a run with every check skipped is not a pass).
set -uo pipefail

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( DEADLINE - $(date +%s) )); }
# stage_budget CAP MIN [RESERVE]: the seconds a stage may run, min(CAP, time left
# - RESERVE), RESERVE being kept for the stages after it; prints nothing and
# fails when that is below MIN, the least the stage needs to mean anything
stage_budget() {
  local b=$(( $(left) - ${3:-0} ))
  [ "$b" -gt "$1" ] && b=$1
  [ "$b" -ge "$2" ] || return 1
  echo "$b"
}
stage() { SUMMARY+=("$(printf '%-7s %-5s t=%4ss  %s' "$1" "$2" "$(elapsed)" "${3:-}")"); }
# skip_for_time NAME MIN [RESERVE]: the table line of a stage stage_budget refused
skip_for_time() {
  local have=$(( $(left) - ${3:-0} ))
  [ "$have" -lt 0 ] && have=0
  stage "$1" SKIP "not started: ${have} s of the ${BUDGET} s budget left for it$( [ "${3:-0}" -gt 0 ] && echo " (${3} s kept for later stages)"), it needs >= $2 s"
}
# pytest counts from a log ("3 failed, 40 passed, 2 skipped in 9.1s")
counts() { grep -E '[0-9]+ (passed|failed|error|skipped)' "$1" | tail -1 | sed 's/=//g; s/^ *//'; }
TO() { timeout -k 5 "$@"; }  # a stage that ignores SIGTERM is killed 5 s later

# sourced (tests/test_gpu_check_budget.py): the functions only, nothing runs
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rjepa_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-500}
# GPU_CHECK_EMULATED=1: a dry run on the emulated CUDA device (RJEPA_CUDA=emu
# build, no GPU, no nvidia-smi) so that every stage of this script has run:
# the emulated build, small test selections, no ptxas, no benchmark
# (tests/test_gpu_check_dry.py runs it in CI)
EMULATED=${GPU_CHECK_EMULATED:-0}
BUILD_CUDA=1 K_OPS=() K_MODEL=() K_FAMILY=() PARITY_ARCHS= PARITY_TEXTS=()
if [ "$EMULATED" = 1 ]; then
  BUILD_CUDA=emu
  export GPU_CHECK_SKIP_BENCH=1
  K_OPS=(-k test_cuda_ops)   # skips: CI runs the op test on the emulated device itself
  K_MODEL=(-k "bf16[qwen3-mma] or bf16[qwen3-fma] or fp32[qwen3] or device_contract")
  K_FAMILY=(-k "bf16[gemma2-mma] or fp32[gemma2]")
  PARITY_ARCHS=qwen3 PARITY_TEXTS=(--texts 3)
fi
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
SUMMARY=()
SCRATCH=$(mktemp -d /tmp/rjepa_gpu_check.XXXXXX)

# ---- env: the machine ------------------------------------------------------------------
cat > "$SCRATCH/env.py" <<'EOF'
import importlib.util, sys
import numpy, torch, transformers
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "transformers", transformers.__version__,
      "numpy", numpy.__version__)
have = {m: importlib.util.find_spec(m) is not None
        for m in ("scipy_openblas32", "gguf", "pytest_timeout")}
print("optional:", ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in have.items()))
EOF
{
  date -u
  [ "$EMULATED" = 1 ] ||
    TO 15 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv
  TO 15 nvcc --version | tail -2
  TO 30 "$PY" "$SCRATCH/env.py"
} > "$OUT/env.txt" 2>&1
rc=$?
cat "$OUT/env.txt"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
[ "$EMULATED" = 1 ] && GPU_NAME="emulated CUDA device (RJEPA_CUDA=emu, on the CPU; a dry run)"
if [ $rc = 0 ] && [ -n "$GPU_NAME" ]; then stage env ok "$GPU_NAME"
elif [ -z "$GPU_NAME" ]; then stage env FAIL "nvidia-smi names no GPU: see env.txt"
else stage env FAIL "rc=$rc: see env.txt (nvcc or torch missing?)"; fi

# the bench's 16 GB checkpoint is written (or found in its cache) in the
# background, by torch on the GPU, while the extension builds and is tested
PREP_PID=
if [ -n "$GPU_NAME" ] && [ "${GPU_CHECK_SKIP_BENCH:-0}" != 1 ]; then
  TO 200 "$PY" tests/gpu_bench.py --prepare > "$SCRATCH/prepare.log" 2>&1 &
  PREP_PID=$!
fi
wait_prepare() {  # bounded by its timeout; records its outcome for bench.log
  [ -n "$PREP_PID" ] || return 0
  wait "$PREP_PID"
  PREP_NOTE="prepare: exit $? ($(tail -1 "$SCRATCH/prepare.log" 2>/dev/null))"
  PREP_PID=
}
PREP_NOTE=

# cuBLAS for the loader (it would also find torch's nvidia wheel by itself) and
# its headers for test_cuda_build.py's constants check
RJEPA_CUBLAS_DIR=$(TO 30 "$PY" - <<'EOF'
import pathlib, sys
for p in sys.path:
    for sub in ("nvidia/cu13/lib", "nvidia/cublas/lib"):
        d = pathlib.Path(p or ".") / sub
        if d.is_dir() and any(d.glob("libcublas.so*")):
            print(d.resolve())
            raise SystemExit
EOF
)
export RJEPA_CUBLAS_DIR
if [ -n "$RJEPA_CUBLAS_DIR" ] && [ -f "$(dirname "$RJEPA_CUBLAS_DIR")/include/cublas_api.h" ]; then
  export RJEPA_CUBLAS_INCLUDE="$(dirname "$RJEPA_CUBLAS_DIR")/include"
fi
echo "RJEPA_CUBLAS_DIR=${RJEPA_CUBLAS_DIR:-<not found>} RJEPA_CUBLAS_INCLUDE=${RJEPA_CUBLAS_INCLUDE:-<none>}" >> "$OUT/env.txt"

# ---- build: in place, with CUDA, warnings as errors -------------------------------------------
build() {  # $1: RJEPA_WERROR value, $2: time limit
  rm -rf build rjepa_latent/_core*.so
  RJEPA_CUDA=$BUILD_CUDA RJEPA_WERROR=$1 TO "$2" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 &&
    TO 60 "$PY" -c "import rjepa_latent as rl; i = rl.build_info(); assert i['cuda'], i; print(i)" \
      >> "$OUT/build.log" 2>&1
}
: > "$OUT/build.log"
BUILT=0
if ! b=$(stage_budget 200 60 200); then skip_for_time build 60 200
elif build 1 "$b"; then
  stage build ok "-Werror; $(tail -1 "$OUT/build.log" | cut -c1-90)"
  BUILT=1
else
  stage build FAIL "with -Werror: see build.log"
  grep -m 15 -iE "error|warning" "$OUT/build.log"
  if b=$(stage_budget 150 100 200); then
    echo "===== retry without -Werror =====" >> "$OUT/build.log"
    if build 0 "$b"; then stage build2 ok "without -Werror: the tests run on this build"; BUILT=1
    else stage build2 FAIL "see build.log"; tail -30 "$OUT/build.log"; fi
  else skip_for_time build2 100 200; fi
fi
# the kernels object setup.py built: the op test links it instead of running nvcc again
KOBJ=$(ls build/temp*/kernels/cuda_kernels.o 2>/dev/null | head -1)
[ -n "$KOBJ" ] && export RJEPA_CUDA_KERNELS_OBJ=$PWD/$KOBJ
# registers / spills of every kernel: the build ran ptxas -v (setup.py) and kept its report
PTXAS_LOG=$(ls build/temp*/kernels/cuda_kernels.ptxas.txt 2>/dev/null | head -1)
if [ "$BUILT" = 1 ] && [ -n "$PTXAS_LOG" ]; then
  cp "$PTXAS_LOG" "$OUT/ptxas.txt"
  grep -E "^rjepa_latent: ptxas: .* sm_90a:" "$OUT/build.log" | sed 's/^rjepa_latent: ptxas: //' \
    > "$SCRATCH/ptxas_summary.txt"
fi

PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  PYTEST+=(--timeout=150 -o timeout_method=thread)  # a hung kernel ends its test, not the run
fi

# ---- ops: the C op test in cuda mode (and cpu mode), the build checks ---------------------------
OPS_BIN=$SCRATCH/ops_bin
rc=skip
if [ "$BUILT" = 1 ]; then
  if ! b=$(stage_budget 120 40 120); then skip_for_time ops 40 120; rc=skip
  else
    RJEPA_OPS_BINDIR=$OPS_BIN TO "$b" "${PYTEST[@]}" -s \
        $( [ "$EMULATED" = 1 ] || echo tests/test_cuda_build.py ) tests/test_backend_ops.py "${K_OPS[@]}" \
        > "$OUT/ops.log" 2>&1
    rc=$?
  fi
fi
if [ "$BUILT" = 1 ] && [ "$rc" != skip ]; then
  grep -E "^(FAIL|     )" "$OUT/ops.log" | head -20
  tail -5 "$OUT/ops.log"
  cases=$(grep -E "^test_backend_ops cuda: " "$OUT/ops.log" | tail -1 | sed 's/^test_backend_ops //')
  if [ $rc = 0 ] && grep -q "SKIPPED.*test_backend_ops" "$OUT/ops.log"; then
    stage ops SKIP "$(counts "$OUT/ops.log") (why: the SKIPPED lines of ops.log)"
  elif [ $rc = 0 ]; then stage ops ok "${cases:-?}; $(counts "$OUT/ops.log")"
  else
    stage ops FAIL "${cases:-no cuda summary} $( [ $rc -ge 124 ] && echo "(exit $rc: timed out?)"); $(counts "$OUT/ops.log")"
    # memory errors / races of the failing kernels, on the same inputs, if time allows
    seed=$(grep -oE "^test_backend_ops cuda, seed [0-9]+" "$OUT/ops.log" | grep -oE "[0-9]+$" | tail -1)
    exe=$OPS_BIN/cuda/test_backend_ops_cuda
    if command -v compute-sanitizer > /dev/null && [ -x "$exe" ] && [ -n "$seed" ] && [ "$(left)" -gt 300 ]; then
      failed_op=$(grep -E "^FAIL +cuda" "$OUT/ops.log" | head -1 | awk '{print $3}')
      echo "===== compute-sanitizer $exe cuda --seed $seed --filter ${failed_op:-attention} =====" >> "$OUT/ops.log"
      TO 90 compute-sanitizer --print-limit 10 "$exe" cuda --seed "$seed" --filter "${failed_op:-attention}" \
          >> "$OUT/ops.log" 2>&1
      grep -m 20 -E "=========|Invalid|out of bounds" "$OUT/ops.log" | tail -20
    fi
  fi
fi

# a broken tensor-core attention must not hide the rest: fall back to the FMA kernel
if [ -f "$OUT/ops.log" ] && grep -qE "^FAIL +cuda-bf16 +attention" "$OUT/ops.log" \
   && ! grep -qE "^FAIL +cuda-bf16-fma +attention" "$OUT/ops.log"; then
  export RJEPA_ATTN=fma
  stage attn NOTE "mma attention failed its op tests: model tests + bench use RJEPA_ATTN=fma"
fi

# ---- model: whole-model parity vs HF, packing, device contract ----------------------------------
wait_prepare  # the device contract test measures free device memory: no other GPU user
rc=skip
if [ "$BUILT" = 1 ] && [ "${GPU_CHECK_SKIP_MODEL:-0}" != 1 ]; then
  if ! b=$(stage_budget 200 60 100); then skip_for_time model 60 100; rc=skip
  else
    TO "$b" "${PYTEST[@]}" -s tests/test_gpu_model.py "${K_MODEL[@]}" > "$OUT/model.log" 2>&1
    rc=$?
  fi
fi
if [ "$BUILT" = 1 ] && [ "${GPU_CHECK_SKIP_MODEL:-0}" != 1 ] && [ "$rc" != skip ]; then
  grep -E "^(llama|mistral|qwen|gemma|olmo)|layer [0-9]+:" "$OUT/model.log" > "$SCRATCH/parity.txt"
  grep -E "^fp32 " "$OUT/model.log" > "$SCRATCH/parity_fp32.txt"
  tail -15 "$OUT/model.log"
  if [ $rc = 0 ] && ! grep -q "SKIPPED" "$OUT/model.log"; then stage model ok "$(counts "$OUT/model.log")"
  elif [ $rc = 0 ]; then stage model SKIP "$(counts "$OUT/model.log")"
  elif [ $rc -ge 124 ]; then stage model FAIL "timed out after ${b}s: $(counts "$OUT/model.log")"
  else stage model FAIL "$(counts "$OUT/model.log")"; fi
fi

# ---- families: Gemma-2 / Gemma-3 / OLMo-2 (and sliding windows): CUDA parity vs HF on the GPU
# (tests/test_gpu_families.py), and the CPU engine's parity tests of each family ---------------
ARCH_TESTS=()
for f in tests/test_gpu_families.py tests/test_arch_gemma2.py tests/test_arch_gemma3.py \
         tests/test_arch_olmo2.py tests/test_arch_sliding.py; do
  [ -f "$f" ] && ARCH_TESTS+=("$f")
done
rc=skip
if [ "$BUILT" = 1 ] && [ "${GPU_CHECK_SKIP_MODEL:-0}" != 1 ]; then
  if [ ${#ARCH_TESTS[@]} = 0 ]; then stage family SKIP "no family test files"
  else
    echo "===== family tests: ${ARCH_TESTS[*]} =====" >> "$OUT/model.log"
    rc=skip
    if ! b=$(stage_budget 150 40 100); then skip_for_time family 40 100
    else
      TO "$b" "${PYTEST[@]}" -s "${ARCH_TESTS[@]}" "${K_FAMILY[@]}" > "$SCRATCH/family.log" 2>&1
      rc=$?
    fi
  fi
fi
if [ "$BUILT" = 1 ] && [ "${GPU_CHECK_SKIP_MODEL:-0}" != 1 ] && [ ${#ARCH_TESTS[@]} != 0 ] && [ "$rc" != skip ]; then
  cat "$SCRATCH/family.log" >> "$OUT/model.log"
  grep -E "^(gemma|olmo)|layer [0-9]+:" "$SCRATCH/family.log" >> "$SCRATCH/parity.txt"
  grep -E "^fp32 " "$SCRATCH/family.log" >> "$SCRATCH/parity_fp32.txt"
  tail -8 "$SCRATCH/family.log"
  if [ $rc = 0 ] && ! grep -q "SKIPPED" "$SCRATCH/family.log"; then stage family ok "$(counts "$SCRATCH/family.log")"
  elif [ $rc = 0 ]; then stage family SKIP "$(counts "$SCRATCH/family.log") (see the SKIPPED lines in model.log)"
  elif [ $rc -ge 124 ]; then stage family FAIL "timed out after ${b}s: $(counts "$SCRATCH/family.log")"
  else stage family FAIL "$(counts "$SCRATCH/family.log")"; fi
fi

# ---- parity: the user's own check (`rjepa-latent parity`) on tiny models, bf16 and fp32 ------
# making the tiny models (<= 90 s) and at least two runs must fit
if [ "$BUILT" = 1 ] && [ "${GPU_CHECK_SKIP_MODEL:-0}" != 1 ] && ! stage_budget 999 130 >/dev/null; then
  skip_for_time parity 130
elif [ "$BUILT" = 1 ] && [ "${GPU_CHECK_SKIP_MODEL:-0}" != 1 ]; then
  # conftest's tiny models, and the families' of tests/test_gpu_families.py
  TO 90 "$PY" - "$SCRATCH/tiny" >> "$OUT/model.log" 2>&1 <<'EOF'
import pathlib, sys
sys.path.insert(0, "tests")
from conftest import build_tiny_model
from test_gpu_families import _build
out = pathlib.Path(sys.argv[1])
for arch in ("qwen3", "llama3_rope"):
    build_tiny_model(arch, out / arch)
for name in ("gemma2", "gemma3", "olmo2"):
    _build(name, out / name)
EOF
  prc=0 not_run=0
  for arch in ${PARITY_ARCHS:-$(ls "$SCRATCH/tiny" 2>/dev/null)}; do
    for dt in bfloat16 float32; do
      if ! b=$(stage_budget 60 20 60); then not_run=$((not_run + 1)); continue; fi
      echo "===== rjepa-latent parity --model <tiny $arch> --device cuda --dtype $dt =====" >> "$OUT/model.log"
      TO "$b" "$PY" -m rjepa_latent.cli parity --model "$SCRATCH/tiny/$arch" --device cuda \
          --dtype "$dt" "${PARITY_TEXTS[@]}" --json "$SCRATCH/parity-$arch-$dt.json" >> "$OUT/model.log" 2>&1 || prc=1
    done
  done
  skipped_note=$( [ $not_run -gt 0 ] && echo "; $not_run runs not started (under 20 s of the budget left for each)")
  TO 30 "$PY" - "$SCRATCH" > "$SCRATCH/parity_cli.txt" 2>&1 <<'EOF'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("parity-*.json")):
    j = json.loads(f.read_text())
    worst = max(j["layers"], key=lambda r: r["worst_rel_err"] / r["bound"])
    print(f"{f.stem[7:]:22s} {'PASS' if j['passed'] else 'FAIL'}  worst layer {worst['layer']}: "
          f"{worst['worst_rel_err']:.2e} (bound {worst['bound']:.2e}); batch max diff "
          f"{j['batch_invariance']['max_abs_diff']:.1e}")
EOF
  if [ $prc = 0 ]; then stage parity ok "rjepa-latent parity: $(grep -c PASS "$SCRATCH/parity_cli.txt") runs passed$skipped_note"
  else stage parity FAIL "rjepa-latent parity: see model.log$skipped_note"; fi
fi

# ---- bench: Qwen3-8B shape, ours vs HF ----------------------------------------------------------
if [ "$BUILT" = 1 ] && [ "${GPU_CHECK_SKIP_BENCH:-0}" != 1 ]; then
  if ! b=$(stage_budget 600 60 10); then skip_for_time bench 60 10
  else
    QUICK=()
    if [ "${GPU_CHECK_QUICK:-0}" = 1 ] || [ "$(left)" -lt 240 ]; then QUICK=(--quick); fi
    echo "${PREP_NOTE:-prepare: not run}" > "$OUT/bench.log"
    TO "$b" "$PY" tests/gpu_bench.py "${QUICK[@]}" --json "$OUT/gpu_bench.json" >> "$OUT/bench.log" 2>&1
    rc=$?
    if [ $rc = 0 ]; then stage bench ok "${QUICK[*]}"
    else stage bench FAIL "rc=$rc ($( [ $rc -ge 124 ] && echo "timed out after ${b}s" || echo error)); see bench.log"
      tail -20 "$OUT/bench.log"; fi
  fi
fi

[ "$EMULATED" = 1 ] && stage bench SKIP "emulated device: no GPU to time (dry run)"

# ---- summary (last, so the end of the output is the table) ---------------------------------------
wait_prepare  # (already done unless the build failed)
{
  echo "===== rjepa_latent GPU check: ${GPU_NAME:-no GPU} ($(date -u +%FT%TZ), $(elapsed) s) ====="
  if [ -s "$SCRATCH/ptxas_summary.txt" ]; then echo "--- ptxas (sm_90a): kernels that spill registers"
     cut -c1-150 "$SCRATCH/ptxas_summary.txt"
  elif [ -s "$OUT/ptxas.txt" ]; then echo "--- ptxas (sm_90a): no kernel spills registers"; fi
  if [ -s "$SCRATCH/parity.txt" ]; then echo "--- parity (rel err to fp32 HF: ours vs HF bf16, deepest layer)"
     awk '/^[a-z]/{arch=$1} /layer/{last[arch]=$0} END{for (a in last) print a ": " last[a]}' "$SCRATCH/parity.txt"; fi
  if [ -s "$SCRATCH/parity_fp32.txt" ]; then echo "--- fp32 parity (rel err to fp32 HF, worst layer; bound 1e-4)"
     cut -c1-110 "$SCRATCH/parity_fp32.txt"; fi
  if [ -s "$SCRATCH/parity_cli.txt" ]; then echo "--- rjepa-latent parity (tiny models, cuda)"
     cat "$SCRATCH/parity_cli.txt"; fi
  if [ -f "$OUT/bench.log" ]; then echo "--- benchmark"; sed -n '/^device:/,$p' "$OUT/bench.log"; fi
  echo "--- stages"
  printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.txt"
rm -rf "$SCRATCH"
# exit status: 0 only when no stage failed and something was checked on the
# device (the op tests or the model tests passed): a run whose stages were all
# skipped, for want of time or of a build, is not a pass
STAGES_TEXT=$(printf '%s\n' "${SUMMARY[@]}")
! grep -qE '^[a-z0-9]+ +FAIL' <<<"$STAGES_TEXT" && grep -qE '^(ops|model|family) +ok' <<<"$STAGES_TEXT"
