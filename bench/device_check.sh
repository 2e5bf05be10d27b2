#!/usr/bin/env bash
# One-call GPU check (issue 6): build the CUDA extension, run the CUDA tests, run the benchmark, dump a SASS summary.
# Run from the repository root on the GPU machine (python3 with a CUDA torch, nvcc, no network):
#     OUT=/some/dir bash bench/device_check.sh
# Everything goes to $OUT (default ./device_out). Every step runs under `timeout` so one hang cannot eat the budget
# (about 7 minutes in all); the script keeps going after a failure, so all logs come back, and exits non-zero if any
# step failed. Override a step's limit with BUILD_S, TEST_S, TIMING_S, BENCH_S (seconds; defaults sum to 425).
set -u
set -x
OUT="${OUT:-$PWD/device_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUILD_S="${BUILD_S:-180}"
TEST_S="${TEST_S:-100}"
TIMING_S="${TIMING_S:-45}"
BENCH_S="${BENCH_S:-100}"
failed=()
start=$(date +%s)

step() {  # step NAME SECONDS CMD...: runs CMD under timeout, records a failure, never stops the script
  local name=$1 secs=$2
  shift 2
  local t0=$(date +%s)
  timeout --kill-after=10 "$secs" "$@"
  local rc=$?
  echo "[device_check] step $name rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.txt"
  [ "$rc" -eq 0 ] || failed+=("$name(rc=$rc)")
  return 0
}

{
  date -u
  nvidia-smi
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,memory.total --format=csv
  "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  nvcc --version
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Build (editable, against the machine's own torch). AGL_PTXAS_VERBOSE=1: ptxas register/spill report in the log.
step build "$BUILD_S" bash -c "TORCH_CUDA_ARCH_LIST=9.0 AGL_PTXAS_VERBOSE=1 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tee '$OUT/build.log'; exit \${PIPESTATUS[0]}"
grep -E "registers|spill|Compiling entry" "$OUT/build.log" > "$OUT/ptxas.txt" 2>/dev/null || true
# one line per kernel: name, registers, spills
paste - - - < "$OUT/ptxas.txt" 2>/dev/null | sed -E 's/.*(terms_[a-z]+_kernel|reduce_[a-z]+_kernel)I([A-Za-z0-9_]*)EEv.*Used ([0-9]+) registers.*/\1 \2 regs=\3/' | head -40 || true
grep -c "[1-9][0-9]* bytes spill" "$OUT/ptxas.txt" 2>/dev/null | sed 's/^/kernels with spills: /' || true
tail -n 5 "$OUT/build.log" 2>/dev/null || true
"$PY" -c 'import agl, agl.ops as o; print("extension", o.available(), "with_cuda", o.with_cuda())' > "$OUT/import.txt" 2>&1 || failed+=("import")

# 2. The CUDA tests (all of them, no -x: we want every failure). --timeout only if pytest-timeout is installed.
TO=""
"$PY" -c 'import pytest_timeout' 2>/dev/null && TO="--timeout 120"
step pytest "$TEST_S" bash -c "$PY -m pytest -m cuda -q -rfE $TO tests/test_cuda.py tests/test_ops.py -p no:cacheprovider > '$OUT/pytest.log' 2>&1"
tail -n 40 "$OUT/pytest.log" || true

# 3a. Quick kernel-vs-eager timing (about 20 s): numbers even if the full benchmark runs out of time.
step timing "$TIMING_S" bash -c "$PY bench/kernel_timing.py --out '$OUT/kernel_timing.json' > '$OUT/kernel_timing.log' 2>&1"
cat "$OUT/kernel_timing.log" || true

# 3b. The benchmark (fused op vs eager and compiled reference) on the two target shapes; BENCH_ARGS overrides.
BENCH_ARGS="${BENCH_ARGS:---shapes 4096x4096r16,4096x11008r16 --dtypes float32,bfloat16}"
if [ -f bench/bench_ops.py ]; then
  if "$PY" bench/bench_ops.py --help 2>/dev/null | grep -q -- "--out"; then
    step bench "$BENCH_S" bash -c "$PY bench/bench_ops.py --device cuda $BENCH_ARGS --out '$OUT/bench_cuda.json' > '$OUT/bench.log' 2>&1"
  else
    step bench "$BENCH_S" bash -c "$PY bench/bench_ops.py --device cuda $BENCH_ARGS > '$OUT/bench.log' 2>&1"
    cp bench/results/*.json "$OUT/" 2>/dev/null || true
  fi
  tail -n 40 "$OUT/bench.log" || true
else
  echo "bench/bench_ops.py missing" | tee "$OUT/bench.log"
  failed+=("bench(missing)")
fi

# 4. SASS summary of the built kernels: instruction mix per kernel (FFMA/LDS/LDG/spills), small.
SO=$(ls agl/_C*.so 2>/dev/null | head -n 1)
if [ -n "$SO" ] && command -v cuobjdump > /dev/null; then
  timeout 60 cuobjdump --dump-sass "$SO" > "$OUT/sass_full.txt" 2>&1 || failed+=("cuobjdump")
  awk '
    /Function :/ { if (fn != "") print fn, "FFMA=" c["FFMA"], "DFMA=" c["DFMA"], "LDS=" c["LDS"], "STS=" c["STS"], "LDG=" c["LDG"], "STG=" c["STG"], "LDL=" c["LDL"], "STL=" c["STL"], "MUFU=" c["MUFU"], "BAR=" c["BAR"], "total=" tot; fn = $3; delete c; tot = 0; next }
    /\/\*[0-9a-f]+\*\// { for (i = 1; i <= NF; i++) if ($i ~ /^[A-Z][A-Z0-9]+(\.|$)/ && $i !~ /^R[0-9]/ && $i !~ /^P[0-9]/) { split($i, op, "."); c[op[1]]++; tot++; break } }
    END { if (fn != "") print fn, "FFMA=" c["FFMA"], "DFMA=" c["DFMA"], "LDS=" c["LDS"], "STS=" c["STS"], "LDG=" c["LDG"], "STG=" c["STG"], "LDL=" c["LDL"], "STL=" c["STL"], "MUFU=" c["MUFU"], "BAR=" c["BAR"], "total=" tot }
  ' "$OUT/sass_full.txt" > "$OUT/sass.txt" 2>&1 || true
  # keep only the summary and the float32 kernels' full SASS (small enough to read)
  awk '/Function :.*Ifff/ {keep = 1} /Function :/ && !/Ifff/ {keep = 0} keep' "$OUT/sass_full.txt" > "$OUT/sass_fff.txt" 2>/dev/null || true
  rm -f "$OUT/sass_full.txt"
else
  echo "no extension .so or no cuobjdump" > "$OUT/sass.txt"
fi

echo "[device_check] total $(( $(date +%s) - start ))s; failed: ${failed[*]:-none}" | tee -a "$OUT/steps.txt"
[ ${#failed[@]} -eq 0 ]
