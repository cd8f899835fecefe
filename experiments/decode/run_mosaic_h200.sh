#!/usr/bin/env bash
# The Mosaic GPU GEMV (wina_jax.kernels.mosaic_gemv, issue 25) on one H200 in one device call. From the
# repository root:
#
#   experiments/decode/run_mosaic_h200.sh $OUT
#
#   probe   (not default) experiments.decode.sync_probe --dump: the grid-wide wait kernels (empty waits, the watchdog's
#           case, `exchange`) each in its own process under PROBE_CASE_S (default 20 s), reporting the stage each
#           reached (PROBE_CASES: other cases), with Mosaic's PTX dumps -> OUT/sync_probe.json, OUT/sync_probe_dump.tgz
#   tests   pytest -k gpu tests/test_mosaic_{sync,gemv,mlp,site,pdl}.py (the kernels against XLA / their contracts; TESTS_K:
#           another -k, TESTS_FILES: other files, TESTS_OPTS: pytest options, default -x) under TESTS_S (default 300 s; the gemv cases alone took 137 s)
#           -> OUT/tests.log (TESTS_LOG: another name)
#   sweep   experiments.decode.mosaic_sweep under SWEEP_S (default 330 s; --budget_s 50 s less): per Llama-3-8B
#           fused shape (SHAPES, largest first), XLA dense, the dense kernel (DENSE specs), the kept-row kernel
#           (ROWS specs) and the Pallas-Triton per-site tiling at 0 / 50 / 65 / 99.9 % -> OUT/mosaic_sweep.json
#   decode  (not in the default STAGES) bench_decode, Llama-3-8B, batch 1, Pallas attention, TEAL at 0 / 50 / 65 /
#           99.9 % (SPARSITIES): dense, the per-site Triton kernels (benchmarks/configs/h200_partials.json) and backend 'mosaic'
#           at each of MCONFIGS (comma-separated mosaic_gemv.parse specs, default 64:64:4:0:264) in one run, with
#           the weightless step, under DECODE_S (default 300 s) -> OUT/bench_llama_mosaic.json (DECODE_NAME: another name;
#           MCONFIGS=none: no Mosaic rows; a spec ending ':true' launches with PDL, MosaicConfig.pdl;
#           DECODE_FLAGS: more bench_decode flags, e.g. --fuse_norm=false,true or --pdl_trigger=false,true); MOSAIC_MODES (e.g. fold,mlp22,mlp)
#           also times each tiling in those modes (decode_setup.on_mosaic: fold = each site's launch runs the norm
#           before it / the residual add after it; mlp22 = session 22's MLP launch; mlp = the MLP launch, folded)
#   marks   (not default) experiments.decode.mosaic_marks: the fused kernel's own clock per phase (compaction, tiles,
#           store) on each Llama fused shape at MARKS_SPECS (default 64:64:4:0:132,64:256:3:0:132) and SPARSITIES
#           (default 0,0.5,0.999 here) under MARKS_S (default 240 s) -> OUT/mosaic_marks.json
#   check   (not default) experiments.decode.check_decode --mosaic=CHECK_SPEC (default 64:256:3:0:132:cp_async:kernel)
#           --mosaic_mode=CHECK_MODE (default mlp): one decode step's logits on Llama-3-8B shapes (2 and 32 layers, 0 / 50 % TEAL), the Mosaic
#           kernels with the MLP launch against the XLA path, beside the model's own one-ulp sensitivity, under
#           CHECK_S (default 240 s) -> OUT/check_mosaic.log
#   profile (not default) profile_decode --mosaic=PROFILE_SPEC (default 64:64:4:0:132:cp_async:kernel), Llama-3-8B,
#           PROFILE_VARIANTS (default teal:0.5,teal:0.999; +fold / +mlp22 / +mlp: the on_mosaic modes), Pallas attention: per-kernel busy time of the step under PROFILE_S (default 240 s)
#           -> OUT/profile_mosaic.json (PROFILE_SPEC=none: the per-site Triton kernels; PROFILE_FLAGS: more flags,
#           e.g. --fuse_norm; PROFILE_NAME: another file name than profile_mosaic)
#   floor   (not default) experiments.decode.launch_floor: an empty launch's cost in a jitted chain and its profile,
#           per kind (XLA select, Triton, Mosaic with 0 / 96 / 200 KiB shared memory, Mosaic with one grid-wide
#           wait, Mosaic launched with PDL) on 1 program, all SMs and 1792 programs, under FLOOR_S (default 240 s)
#           -> OUT/launch_floor.json (FLOOR_NAME: another name; FLOOR_FLAGS: more flags, e.g. --programs=0)
# XLA_FLAGS reaches every stage (e.g. --xla_gpu_enable_pdl=false, --xla_gpu_enable_command_buffer=); each JSON
# records it (xla_flags) and whether jax launched the ':true' / '+pdl' Mosaic kernels with PDL (mosaic_pdl_launch).
#   waits   (not default) experiments.decode.wait_cost --backend=mosaic: the Mosaic grid-wide wait
#           (wina_jax.kernels.mosaic_sync) on all SMs and half of them, 1 / 2 / 6 / 64 waits per launch, each launch
#           checking that every program reads its neighbour's value of every phase, under WAITS_S (default 120 s)
#           -> OUT/wait_mosaic.json; tests/test_mosaic_sync.py GPU cases run in the tests stage (TESTS_FILES)
#   mlp     (not default) experiments.decode.mosaic_mlp: gate|up, wait, down in one persistent launch
#           (wina_jax.kernels.mosaic_mlp) against the per-site launches and XLA dense, Llama-3-8B MLP, at MLP_SPECS
#           (default 64:256:3:0:132) and SPARSITIES (default 0,0.5,0.65,0.999) under MLP_S (default 180 s)
#           -> OUT/mosaic_mlp.json; its GPU tests (tests/test_mosaic_mlp.py) run in the tests stage
# STAGES (comma-separated, default tests,sweep) runs a subset; a stage past its limit ends with rc 124 and its
# Python stacks in its log; extra arguments go to mosaic_sweep. A failed tests
# stage ends the call there (a kernel that computes wrong sums is not worth timing) unless FORCE=1.
set -u
OUT=${1:?usage: run_mosaic_h200.sh OUT [mosaic_sweep flags]}
shift
mkdir -p "$OUT"
STAGES=${STAGES:-tests,sweep}
SWEEP_S=${SWEEP_S:-330}
SHAPES=${SHAPES:-4096x28672,14336x4096,4096x6144,4096x4096}
# a stage cut off by its timeout still leaves its log, ending in every thread's Python stack (SIGABRT, the fault
# handler; rc 124): where it hung, compiling or waiting on the GPU
export PYTHONPATH=. PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
# compiles kept under $HOME, which outlives a call while the machine stays warm: a later call skips them
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/wina_jax_xla} JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv; python3 -c "import jax; print(jax.__version__, jax.devices())"; } > "$OUT/gpu.txt" 2>&1
if [[ ,$STAGES, == *,probe,* ]]; then
  probe=(--dump --case_s="${PROBE_CASE_S:-20}" --out="$OUT/sync_probe.json")
  [[ -n ${PROBE_CASES:-} ]] && probe+=(--cases="$PROBE_CASES")
  timeout -s ABRT -k 10 "${PROBE_S:-240}" python3 -m experiments.decode.sync_probe "${probe[@]}" > "$OUT/sync_probe.log" 2>&1
  echo "probe rc=$?" >> "$OUT/sync_probe.log"
  # the dumps in one file (a call brings back only so many)
  tar -czf "$OUT/sync_probe_dump.tgz" -C "$OUT" sync_probe_dump && rm -r "$OUT/sync_probe_dump"
  grep -v '^[IWE][0-9]' "$OUT/sync_probe.log" | tail -12
fi
if [[ ,$STAGES, == *,tests,* ]]; then
  log=${TESTS_LOG:-tests.log}
  timeout -s ABRT -k 10 "${TESTS_S:-300}" python3 -m pytest -q ${TESTS_OPTS:--x} -p no:cacheprovider ${TESTS_FILES:-tests/test_mosaic_sync.py tests/test_mosaic_gemv.py tests/test_mosaic_mlp.py tests/test_mosaic_site.py tests/test_mosaic_pdl.py} -k "${TESTS_K:-gpu}" > "$OUT/$log" 2>&1
  rc=$?
  echo "tests rc=$rc" >> "$OUT/$log"
  tail -30 "$OUT/$log"
  if [[ $rc != 0 && ${FORCE:-0} != 1 ]]; then
    echo "tests failed: the other stages skipped (FORCE=1 runs them anyway)"
    exit 1
  fi
fi
if [[ ,$STAGES, == *,sweep,* ]]; then
  args=(--budget_s=$((SWEEP_S - 50)) --shapes="$SHAPES" --out="$OUT/mosaic_sweep.json")
  [[ -n ${DENSE:-} ]] && args+=(--dense="$DENSE")
  [[ -n ${ROWS:-} ]] && args+=(--rows="$ROWS")
  timeout -s ABRT -k 10 "$SWEEP_S" python3 -m experiments.decode.mosaic_sweep "${args[@]}" "$@" > "$OUT/mosaic_sweep.log" 2>&1
  echo "sweep rc=$?" >> "$OUT/mosaic_sweep.log"
  grep -v '^[IWE][0-9]' "$OUT/mosaic_sweep.log" | tail -80
fi
if [[ ,$STAGES, == *,decode,* ]]; then
  mconfigs=${MCONFIGS:-64:64:4:0:264}
  name=${DECODE_NAME:-bench_llama_mosaic}
  [[ $mconfigs == none ]] && mconfigs=
  timeout -s ABRT -k 10 "${DECODE_S:-300}" python3 -m experiments.decode.bench_decode --models=llama3_8b --methods=teal \
    --batches=1 --sparsities="${SPARSITIES:-0,0.5,0.65,0.999}" --attention=pallas --reps=3 --host_rows=false \
    --configs=benchmarks/configs/h200_partials.json --mosaic_configs="$mconfigs" --mosaic_modes="${MOSAIC_MODES:-}" \
    ${DECODE_FLAGS:-} --out="$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "decode rc=$?" >> "$OUT/$name.log"
  grep -v '^[IWE][0-9]' "$OUT/$name.log" | tr '\r' '\n' | grep -v 'it/s\]' | tail -40
fi
if [[ ,$STAGES, == *,marks,* ]]; then
  timeout -s ABRT -k 10 "${MARKS_S:-240}" python3 -m experiments.decode.mosaic_marks --specs="${MARKS_SPECS:-64:64:4:0:132,64:256:3:0:132}" \
    --sparsities="${SPARSITIES:-0,0.5,0.999}" --out="$OUT/mosaic_marks.json" > "$OUT/mosaic_marks.log" 2>&1
  echo "marks rc=$?" >> "$OUT/mosaic_marks.log"
  grep -v '^[IWE][0-9]' "$OUT/mosaic_marks.log" | tail -40
fi
if [[ ,$STAGES, == *,waits,* ]]; then
  timeout -s ABRT -k 10 "${WAITS_S:-120}" python3 -m experiments.decode.wait_cost --backend=mosaic --waits=1,2,6,64 \
    --out="$OUT/wait_mosaic.json" > "$OUT/wait_mosaic.log" 2>&1
  echo "waits rc=$?" >> "$OUT/wait_mosaic.log"
  grep -v '^[IWE][0-9]' "$OUT/wait_mosaic.log" | tail -20
fi
if [[ ,$STAGES, == *,mlp,* ]]; then
  timeout -s ABRT -k 10 "${MLP_S:-180}" python3 -m experiments.decode.mosaic_mlp --specs="${MLP_SPECS:-64:256:3:0:132}" \
    --sparsities="${SPARSITIES:-0,0.5,0.65,0.999}" --out="$OUT/mosaic_mlp.json" > "$OUT/mosaic_mlp.log" 2>&1
  echo "mlp rc=$?" >> "$OUT/mosaic_mlp.log"
  grep -v '^[IWE][0-9]' "$OUT/mosaic_mlp.log" | tail -20
fi
if [[ ,$STAGES, == *,check,* ]]; then
  timeout -s ABRT -k 10 "${CHECK_S:-240}" python3 -m experiments.decode.check_decode \
    --mosaic="${CHECK_SPEC:-64:256:3:0:132:cp_async:kernel}" --mosaic_mode="${CHECK_MODE:-mlp}" > "$OUT/check_mosaic.log" 2>&1
  echo "check rc=$?" >> "$OUT/check_mosaic.log"
  grep -E '^CHECK|rc=' "$OUT/check_mosaic.log"
fi
if [[ ,$STAGES, == *,profile,* ]]; then
  name=${PROFILE_NAME:-profile_mosaic}
  spec=${PROFILE_SPEC:-64:64:4:0:132:cp_async:kernel}
  [[ $spec == none ]] && spec=
  timeout -s ABRT -k 10 "${PROFILE_S:-240}" python3 -m experiments.decode.profile_decode --models=llama3_8b --variants="${PROFILE_VARIANTS:-teal:0.5,teal:0.999}" \
    --attention=pallas --configs=benchmarks/configs/h200_partials.json ${PROFILE_FLAGS:-} \
    --mosaic="$spec" --out="$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "profile rc=$?" >> "$OUT/$name.log"
  grep -v '^[IWE][0-9]' "$OUT/$name.log" | tail -40
fi
if [[ ,$STAGES, == *,floor,* ]]; then
  name=${FLOOR_NAME:-launch_floor}
  timeout -s ABRT -k 10 "${FLOOR_S:-240}" python3 -m experiments.decode.launch_floor ${FLOOR_FLAGS:-} --out="$OUT/$name.json" \
    > "$OUT/$name.log" 2>&1
  echo "floor rc=$?" >> "$OUT/$name.log"
  grep -v '^[IWE][0-9]' "$OUT/$name.log" | tail -30
fi
