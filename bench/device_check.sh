#!/usr/bin/env bash
# One-call GPU check (issue 6): build the CUDA extension, run the CUDA tests, time the kernels, run the benchmark,
# profile the kernels once (Nsight Compute), run compute-sanitizer on a small case, summarise the SASS.
# Run from the repository root on the GPU machine (python3 with a CUDA torch, nvcc, no network):
#     OUT=/some/dir bash bench/device_check.sh
# Every step runs under `timeout`, so one hang cannot eat the budget; the script keeps going after a failure and
# exits non-zero if any step failed. Step limits (seconds): BUILD_S TEST_S TIMING_S BENCH_S PROFILE_S NCU_S SAN_S; a limit of
# 0 skips the step. Defaults sum to about 7 minutes.
# What comes back is kept to 7 files in $OUT (the device tool returns at most 8): summary.txt (environment, step
# results, ptxas registers/spills, test and timing tails), build.log, pytest.log, kernel_timing.json,
# bench_cuda.json, ncu.txt, sass.txt. Scratch goes to $WORK (default /tmp/agl_device_check).
set -u
OUT="${OUT:-$PWD/device_out}"
WORK="${WORK:-/tmp/agl_device_check}"
mkdir -p "$OUT" "$WORK"
PY="${PYTHON:-python3}"
BUILD_S="${BUILD_S:-200}"
TEST_S="${TEST_S:-120}"
TIMING_S="${TIMING_S:-45}"
BENCH_S="${BENCH_S:-120}"
NCU_S="${NCU_S:-45}"
SAN_S="${SAN_S:-45}"
PROFILE_S="${PROFILE_S:-60}"
S="$OUT/summary.txt"
failed=()
start=$(date +%s)
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$S"; }
step() {  # step NAME SECONDS CMD...: runs CMD under timeout, records a failure, never stops the script
  local name=$1 secs=$2
  shift 2
  if [ "$secs" -eq 0 ]; then say "[device_check] step $name skipped"; return 0; fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$secs" "$@"
  local rc=$?
  say "[device_check] step $name rc=$rc in $(( $(date +%s) - t0 ))s (at $(( $(date +%s) - start ))s)"
  [ "$rc" -eq 0 ] || failed+=("$name(rc=$rc)")
  return 0
}

{
  date -u
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total --format=csv
  "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  nvcc --version | tail -n 2
  nproc
} >> "$S" 2>&1

# 1. Build (editable, against the machine's own torch). AGL_PTXAS_VERBOSE=1: ptxas register/spill report in the log.
step build "$BUILD_S" bash -c "TORCH_CUDA_ARCH_LIST=9.0 AGL_PTXAS_VERBOSE=1 MAX_JOBS=16 $PY -m pip install -v --no-build-isolation --no-deps -e . > '$OUT/build.log' 2>&1"
tail -n 3 "$OUT/build.log" >> "$S"
{
  echo "--- ptxas (kernel, registers, spills)"
  grep -E "Compiling entry|registers|spill" "$OUT/build.log" | paste - - - \
    | sed -E 's/.*[0-9]((terms|reduce)_[a-z]+_kernel)I(.*)EEv.*bytes stack frame, ([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads.*Used ([0-9]+) registers.*/\1 \3 regs=\6 spill_st=\4 spill_ld=\5/' \
    | head -40
} >> "$S" 2>&1
"$PY" -c 'import agl, agl.ops as o; print("extension", o.available(), "with_cuda", o.with_cuda())' >> "$S" 2>&1 || failed+=("import")

# 2. The CUDA tests (all of them, no -x: we want every failure).
TO=""
"$PY" -c 'import pytest_timeout' 2>/dev/null && TO="--timeout 120"
step pytest "$TEST_S" bash -c "$PY -m pytest -m cuda -q -rfE $TO tests/test_cuda.py tests/test_ops.py -p no:cacheprovider > '$OUT/pytest.log' 2>&1"
{ echo "--- pytest tail"; tail -n 25 "$OUT/pytest.log"; } >> "$S" 2>&1

# 3a. Quick kernel-vs-eager timing: numbers even if the full benchmark runs out of time.
step timing "$TIMING_S" bash -c "$PY bench/kernel_timing.py --out '$OUT/kernel_timing.json' > '$WORK/kernel_timing.log' 2>&1"
{ echo "--- kernel_timing"; cat "$WORK/kernel_timing.log"; } >> "$S" 2>&1

# 3b. The benchmark (fused op vs eager and compiled reference); rows are written after every (shape, dtype).
BENCH_ARGS="${BENCH_ARGS:---shapes 4096x4096r16,4096x11008r16 --dtypes float32,bfloat16}"
step bench "$BENCH_S" bash -c "$PY bench/bench_ops.py --device cuda $BENCH_ARGS --out '$OUT/bench_cuda.json' > '$WORK/bench.log' 2>&1"
{ echo "--- bench"; grep -v "^  " "$WORK/bench.log" | tail -n 40; grep "roofline" "$WORK/bench.log"; } >> "$S" 2>&1

# 3c. Host vs device time of one fwd+bwd call (torch.profiler), float32 4096x4096 r16.
step profile "$PROFILE_S" bash -c "$PY bench/ncu_probe.py --profile --shapes 4096x4096r16,576x576r8 --dtypes float32 > '$WORK/profile.log' 2>&1"
{ echo "--- profile"; cat "$WORK/profile.log"; } >> "$S" 2>&1

# 4. Nsight Compute: one fwd+bwd of the fused op per case; speed-of-light, occupancy, memory and launch sections.
NCU_ARGS="${NCU_ARGS:---shapes 4096x4096r16 --dtypes float32,bfloat16}"
if command -v ncu > /dev/null; then
  step ncu "$NCU_S" bash -c "ncu -k regex:'terms_|reduce_' --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis $PY bench/ncu_probe.py $NCU_ARGS > '$OUT/ncu.txt' 2>&1"
else
  say "no ncu"
fi

# 5. compute-sanitizer memcheck on small odd shapes (out-of-bounds reads/writes in the tile edges).
if command -v compute-sanitizer > /dev/null; then
  step sanitizer "$SAN_S" bash -c "compute-sanitizer --tool memcheck --error-exitcode 9 $PY bench/ncu_probe.py --shapes 67x131r5,1x1r1,130x9r3 --dtypes float32,bfloat16 > '$WORK/sanitizer.log' 2>&1"
  { echo "--- sanitizer"; tail -n 15 "$WORK/sanitizer.log"; } >> "$S" 2>&1
fi

# 6. SASS instruction mix per kernel (FFMA/LDS/LDG/local-memory spills), small.
SO=$(ls agl/_C*.so 2>/dev/null | head -n 1)
if [ -n "$SO" ] && command -v cuobjdump > /dev/null; then
  timeout 60 cuobjdump --dump-sass "$SO" > "$WORK/sass_full.txt" 2>&1 || failed+=("cuobjdump")
  awk '
    function flush() { if (fn != "") print fn, "FFMA=" c["FFMA"], "DFMA=" c["DFMA"], "LDS=" c["LDS"], "STS=" c["STS"], "LDG=" c["LDG"], "STG=" c["STG"], "LDL=" c["LDL"], "STL=" c["STL"], "MUFU=" c["MUFU"], "BAR=" c["BAR"], "total=" tot }
    /Function :/ { flush(); fn = $3; delete c; tot = 0; next }
    /\/\*[0-9a-f]+\*\// { for (i = 1; i <= NF; i++) if ($i ~ /^[A-Z][A-Z0-9]+(\.|$)/ && $i !~ /^R[0-9]/ && $i !~ /^P[0-9]/) { split($i, op, "."); c[op[1]]++; tot++; break } }
    END { flush() }
  ' "$WORK/sass_full.txt" > "$OUT/sass.txt" 2>&1 || true
else
  echo "no extension .so or no cuobjdump" > "$OUT/sass.txt"
fi

say "[device_check] total $(( $(date +%s) - start ))s; failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
