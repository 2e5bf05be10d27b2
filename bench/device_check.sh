#!/usr/bin/env bash
# One-command GPU check (issues 6, 11, 12): build, CUDA tests (with grouped parity), benchmarks, Nsight Compute,
# compute-sanitizer, SASS summary. Run from the repository root on the GPU machine (python3 with a CUDA torch, nvcc,
# no network), from a clean git tree (it refuses otherwise: results must name the commit they measure):
#     OUT=/some/dir bash bench/device_check.sh
# Time: everything fits in TOTAL_S (default 470 s, under 8 minutes). Each step runs under `timeout` with the smaller of
# its own limit and what is left of TOTAL_S; a step with under 15 s left is not started (recorded as failed). The
# script keeps going after a failure and exits non-zero if any step failed. Step limits (seconds; 0 skips a step):
#   BUILD_S PYTEST_S GROUPED_S BENCH_S LOSS_S SAN_S NCU_S
# Results in $OUT (8 files): summary.txt (commit, environment, step results, ptxas registers/spills, test tail, timing
# tables, sanitizer tails, SASS instruction mix), build.log, pytest.log, grouped_timing.json, bench_ops.json,
# bench_loss_default.json, bench_loss_grouped.json, ncu.txt. Scratch goes to $WORK.
set -u
OUT="${OUT:-$PWD/device_out}"
WORK="${WORK:-/tmp/agl_device_check}"
PY="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-470}"
BUILD_S="${BUILD_S:-200}"
PYTEST_S="${PYTEST_S:-120}"
GROUPED_S="${GROUPED_S:-75}"
BENCH_S="${BENCH_S:-45}"
LOSS_S="${LOSS_S:-40}"
SAN_S="${SAN_S:-25}"
NCU_S="${NCU_S:-40}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# ---- a clean tree, or nothing (issue 12): uncommitted or untracked files would make the results unattributable.
if ! git rev-parse --git-dir > /dev/null 2>&1; then
  echo "device_check: not a git checkout; refusing (results must name their commit)" >&2
  exit 2
fi
dirty=$(git status --porcelain --untracked-files=normal)
if [ -n "$dirty" ]; then
  echo "device_check: the git tree is dirty; commit or stash first. Refusing to run. Changes:" >&2
  echo "$dirty" | head -n 20 >&2
  exit 2
fi
COMMIT=$(git rev-parse HEAD)
mkdir -p "$OUT" "$WORK"
S="$OUT/summary.txt"
: > "$S"
failed=()
start=$(date +%s)

say() { echo "$*" | tee -a "$S"; }
left() { echo $(( TOTAL_S - ($(date +%s) - start) )); }
step() {  # step NAME SECONDS CMD...: runs CMD under timeout, records a failure, never stops the script
  local name=$1 secs=$2 t0 rc rem
  shift 2
  if [ "$secs" -eq 0 ]; then say "[device_check] step $name skipped (limit 0)"; return 0; fi
  rem=$(( $(left) - 5 ))
  if [ "$rem" -lt 15 ]; then
    say "[device_check] step $name NOT RUN: out of time (TOTAL_S=$TOTAL_S)"
    failed+=("$name(no time)")
    return 0
  fi
  [ "$secs" -gt "$rem" ] && secs=$rem
  t0=$(date +%s)
  timeout --kill-after=5 "$secs" "$@"
  rc=$?
  say "[device_check] step $name rc=$rc in $(( $(date +%s) - t0 ))s (limit ${secs}s, at $(( $(date +%s) - start ))s)"
  [ "$rc" -eq 0 ] || failed+=("$name(rc=$rc)")
  return 0
}
logged() {  # logged NAME SECONDS LOG LINES CMD: step with output to LOG, then LOG's last LINES lines into the summary
  local name=$1 secs=$2 log=$3 lines=$4
  shift 4
  step "$name" "$secs" bash -c "$* > '$log' 2>&1"
  { echo "--- $name"; tail -n "$lines" "$log"; } >> "$S" 2>&1
}

{
  echo "commit $COMMIT (clean tree)"
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total --format=csv
  "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  nvcc --version | tail -n 2
  echo "cores $(nproc)"
} >> "$S" 2>&1

# 1. Build (editable, against the machine's own torch). AGL_PTXAS_VERBOSE=1: ptxas register/spill report in the log.
step build "$BUILD_S" bash -c "TORCH_CUDA_ARCH_LIST=9.0 AGL_PTXAS_VERBOSE=1 MAX_JOBS=16 $PY -m pip install -v --no-build-isolation --no-deps -e . > '$OUT/build.log' 2>&1"
tail -n 3 "$OUT/build.log" >> "$S"
{
  echo "--- ptxas (kernel, registers, spills)"
  grep -E "Compiling entry|registers|spill" "$OUT/build.log" | paste - - - \
    | sed -E 's/.*[0-9]((terms|reduce|grouped)_[a-z_]+_kernel)I(.*)EEv.*bytes stack frame, ([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads.*Used ([0-9]+) registers.*/\1 \3 regs=\6 spill_st=\4 spill_ld=\5/' \
    | head -60
} >> "$S" 2>&1
"$PY" -c 'import agl.ops as o; print("extension", o.available(), "with_cuda", o.with_cuda(), "grouped override", o.set_cuda_grouped(True), o.cuda_grouped_status()); o.set_cuda_grouped(False)' >> "$S" 2>&1 || failed+=("import")

# 2. Every CUDA test (per-layer kernels, grouped parity on the default path and the opt-in kernels); no -x.
TO=""
"$PY" -c 'import pytest_timeout' 2> /dev/null && TO="--timeout 120"
logged pytest "$PYTEST_S" "$OUT/pytest.log" 30 "$PY -m pytest -m cuda -q -rfE $TO -p no:cacheprovider tests"

# 3. The grouped op on model-shaped sets: 120 x 576^2 r8, 128 x 4096^2 r16, one 4096^2 r16 layer; float32 and bfloat16
#    fisher; per-layer calls, default path, opt-in tensor-core kernels, null provider, reference; graph replay.
logged grouped_timing "$GROUPED_S" "$WORK/grouped.log" 40 \
  "$PY bench/grouped_timing.py --sets one4096,135m,7b --fisher-dtypes float32,bfloat16 --reps 3 --out '$OUT/grouped_timing.json'"

# 4. bench_ops: fused op vs eager and compiled reference (plus the null provider where bench_ops has one).
PROV="agl,eager,compiled"
"$PY" bench/bench_ops.py --help 2> /dev/null | grep -q "null" && PROV="$PROV,null"
logged bench_ops "$BENCH_S" "$WORK/bench_ops.log" 25 \
  "$PY bench/bench_ops.py --device cuda --shapes 4096x4096r16 --dtypes float32,bfloat16 --providers $PROV --out '$OUT/bench_ops.json'"

# 5. AGLLoss on the 135M-shaped model (120 LoRA layers 576^2 r8), default path and AGL_CUDA_GROUPED=1.
if "$PY" bench/bench_loss.py --help 2> /dev/null | grep -q -- "--device"; then
  for mode in default grouped; do
    env_set=""
    [ "$mode" = grouped ] && env_set="AGL_CUDA_GROUPED=1"
    logged "bench_loss_$mode" "$LOSS_S" "$WORK/bench_loss_$mode.log" 15 \
      "$env_set $PY bench/bench_loss.py --device cuda --out '$OUT/bench_loss_$mode.json'"
  done
else
  say "bench/bench_loss.py has no --device option: AGLLoss on CUDA not measured (grouped_timing covers the op)"
  failed+=("bench_loss(no --device)")
fi

# A small odd-shaped grouped call with the opt-in kernels (forward + backward), for the sanitizers and ncu.
cat > "$WORK/grouped_probe.py" << 'EOF'
import sys
import torch
from agl import ops
from agl.functional import agl_terms_grouped
big = len(sys.argv) > 1 and sys.argv[1] == "big"
assert ops.set_cuda_grouped(True), "opt-in grouped kernels missing"
shapes = [(576, 576, 8, 8)] * 4 if big else [(67, 131, 3, 5), (130, 70, 8, 0), (1, 3, 1, 1), (129, 200, 16, 16)]
g = torch.Generator(device="cuda").manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    Bs = [(torch.randn(m, r, device="cuda", generator=g) * 0.2).to(dtype).requires_grad_() for m, n, r, ra in shapes]
    As = [(torch.randn(r, n, device="cuda", generator=g) * 0.2).to(dtype).requires_grad_() for m, n, r, ra in shapes]
    Bas = [(torch.randn(m, ra, device="cuda", generator=g) * 0.2).to(dtype) if ra else None for m, n, r, ra in shapes]
    Aas = [(torch.randn(ra, n, device="cuda", generator=g) * 0.2).to(dtype) if ra else None for m, n, r, ra in shapes]
    Fs = [torch.rand(m, n, device="cuda", generator=g) for m, n, r, ra in shapes]
    out = agl_terms_grouped(Bs, As, Bas, Aas, fishers=Fs, scales=[1.3] * len(shapes), backend="kernel")
    torch.autograd.grad(out.sum(), Bs + As)
torch.cuda.synchronize()
print("grouped probe ok")
EOF

# 6. compute-sanitizer on the small grouped case: memcheck (out-of-bounds), racecheck (shared-memory hazards),
#    synccheck (barrier misuse).
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck synccheck; do
    logged "sanitizer_$tool" "$SAN_S" "$WORK/san_$tool.log" 8 \
      "compute-sanitizer --tool $tool --error-exitcode 9 $PY '$WORK/grouped_probe.py'"
  done
else
  say "no compute-sanitizer"
  failed+=("sanitizer(missing)")
fi

# 7. Nsight Compute on the two main kernels (grouped forward and backward), one launch each, 576^2 r8 x 4 layers.
if command -v ncu > /dev/null; then
  step ncu "$NCU_S" bash -c "ncu -k regex:'grouped_(fwd|bwd)_kernel' -c 4 --section SpeedOfLight --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis $PY '$WORK/grouped_probe.py' big > '$OUT/ncu.txt' 2>&1"
else
  say "no ncu"
  failed+=("ncu(missing)")
fi

# 8. SASS instruction mix per kernel (tensor-core HMMA, FFMA, shared/global memory, local-memory spills).
SO=$(find agl -maxdepth 1 -name '_C*.so' | head -n 1)
if [ -n "$SO" ] && command -v cuobjdump > /dev/null; then
  timeout 60 cuobjdump --dump-sass "$SO" > "$WORK/sass_full.txt" 2>&1 || failed+=("cuobjdump")
  {
    echo "--- SASS instruction mix"
    awk '
      function flush() { if (fn != "") print fn, "HMMA=" c["HMMA"], "FFMA=" c["FFMA"], "DFMA=" c["DFMA"], "LDS=" c["LDS"], "STS=" c["STS"], "LDG=" c["LDG"], "STG=" c["STG"], "LDL=" c["LDL"], "STL=" c["STL"], "MUFU=" c["MUFU"], "BAR=" c["BAR"], "total=" tot }
      /Function :/ { flush(); fn = $3; delete c; tot = 0; next }
      /\/\*[0-9a-f]+\*\// { for (i = 1; i <= NF; i++) if ($i ~ /^[A-Z][A-Z0-9]+(\.|$)/ && $i !~ /^R[0-9]/ && $i !~ /^P[0-9]/) { split($i, op, "."); c[op[1]]++; tot++; break } }
      END { flush() }
    ' "$WORK/sass_full.txt" | grep -E "grouped|terms_" | head -60
  } >> "$S" 2>&1
else
  say "no extension .so or no cuobjdump: no SASS summary"
fi

say "[device_check] commit $COMMIT total $(( $(date +%s) - start ))s; failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
