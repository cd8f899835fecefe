#!/usr/bin/env bash
# Issue 25 on one H200 in one device call: the persistent layer kernel's GPU tests, the cost of one grid-wide
# wait, and bench_decode with the kernel beside the per-site kernels and dense. From the repository root:
#
#   experiments/decode/run_persistent_h200.sh $OUT
#
# Stages, in order, each under its own limit and all under BUDGET_S (default 450 s) in total:
#   watchdog  the one GPU test that would hang if the waits' watchdog failed (a grid of 64 programs per SM
#           passed off as co-resident), alone under 90 s -> OUT/watchdog.log
#   tests   pytest -k gpu tests/test_persistent_layer.py tests/test_kernels.py (single layers of the real shapes
#           vs XLA at 0 / 50 / 65 (WINA) / 99.9 %, a 32-step decode of 4 Llama-3-8B-shaped layers, the refused
#           oversized grid; the per-site kernels on the q|k|v shape, each accumulator) -> OUT/tests.log
#   wait    experiments.decode.wait_cost: empty phases, 0 / 1 / 6 / 64 waits per launch -> OUT/wait_cost.json
#   sweep   Llama-3-8B, dense and TEAL 50 %: the per-site kernels (SETS: --config_sets entries over
#           benchmarks/configs/h200_partials.json) and the persistent kernel at each of PSWEEP's tilings, under
#           SWEEP_S (default 330 s; a config costs ~40 s, mostly compilation) -> OUT/bench_llama_sweep.json
#   timers  phase_timers under TIMERS_S (default 120 s): the kernel's own clock marks inside one launch (PTIMERS,
#           default the sweep's fastest tiling, else the first of PCONFIGS), each phase's work, wait and
#           prologue, Llama-3-8B layer, TEAL 0 / 50 / 65 / 99.9 % -> OUT/phase_timers.json
#   ncu     (not in the default STAGES) Nsight Compute (--clock-control none) on one launch of the layer kernel
#           for each of NCU (comma-separated spec@sparsity, default the sweep's fastest at 0.5; Llama-3-8B layer
#           of phase_timers, which reads the clock 14 times a program): registers, occupancy, warp stall reasons,
#           memory throughput -> OUT/ncu_<i>.log, and each SASS line's stall samples -> OUT/ncu_<i>_source.csv.gz
#           (experiments.decode.ncu_stalls summarizes it)
#   regs    (not in the default STAGES) registers and spills of the layer kernel for each of REGS (comma-separated
#           specs, default PSWEEP's): one launch under XLA's dump flag, then `ptxas -v` on the dumped PTX that holds
#           persistent_layer -> OUT/regs.log (Nsight Compute segfaulted in 5 of 8 starts, sessions 15-16; not yet run)
#   phases  (not in the default STAGES) profile_decode with the kernel split into one launch per phase
#           (PPHASES, a parse_config spec with split true; default the sweep's fastest tiling): each phase's
#           kernel time, dense and TEAL 50 % -> OUT/profile_phases.json; session 12's split kernels took
#           twice the fused one's time, so read it only where its total agrees with the fused kernel's
#   llama   bench_decode, Llama-3-8B shape, batch 1, Pallas attention, TEAL at 0 / 50 / 65 / 99.9 %: dense,
#           the per-site kernels (each of SETS) and the persistent kernel (PCONFIGS, comma-separated
#           persistent_config.parse_config specs, plus the sweep's fastest) in one run, with the no-linear
#           (weightless) step -> OUT/bench_llama.json
#   qwen    the same for Qwen-2.5-7B, if time is left -> OUT/bench_qwen.json
#   wina    Llama-3-8B, WINA at 50 / 65 %, if time is left -> OUT/bench_llama_wina.json
# If the tests stage times out (a hang at a wait), the bench stages run without the persistent kernel. STAGES
# (comma-separated names, default all) runs a subset: e.g. the tests beside other GPU work, the timed stages
# alone. TESTS_K is the tests stage's pytest -k expression (default below). (Session 10's 'precision' stage, the
# bfloat16 vs float32 A/B of XLA dense, is retired: equal since numerics.matmul, 4.236 vs 4.235-4.265 ms in
# session 11.) Run it in the foreground, one device call under 600 s: the machine is released 30 s after a call,
# so a detached run dies unless something polls that often (session 12 lost one that way).
set -u
out=$1
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
end=$((SECONDS + ${BUDGET_S:-450}))
stages=,${STAGES:-watchdog,tests,wait,sweep,timers,llama,qwen,wina},
pconfigs=${PCONFIGS:-128:128:128:8:1:0.875:64:2:resident,128:128:128:8:1:0.875:64:2:resident:false:vector:true,\
64:64:128:8:1:0.875:64:2:column:false:tile}
# chunk:block_k:block_n:num_warps:num_stages:dense_at:block_s:programs_per_sm:mode:split:acc:skip_empty; in
# 'resident' and 'column' modes num_stages is the register prefetch depth (tiles in flight). Measured on the H200
# (decode_h200.md, sessions 13-15, Llama TEAL 50 %): resident 128 x 128, one ahead, 8 warps, 2 per SM is the
# fastest (3.908-3.935 ms, 1.07x; 4 warps 4.03-4.09); 3 programs of 4 warps per SM are not co-resident (the
# watchdog's WaitTimeout); each warp on its own 1024 columns (masked 128:8:1024 tile) 5.270; the 'column' walk
# 3.978-4.032 (64 x 128 / 128 x 64, 8 warps), and tensor-core tiles (acc 'dot') 4.222 (resident) to 5.689.
# Nsight Compute (session 15) puts the time in each tile's ~385 instructions a thread and its shared-memory
# barriers: 10 barriers and 5 shared-memory round trips a tile, all from the [C, BN] tile's sum over its rows
# (warps along the rows) and its conversion to the store layout. Session 16 paid that sum 2-4x less often (a tile
# read as row blocks summed elementwise, block_k < chunk) and lost 12-17 % at 50 % (256:64:128 4.411 ms, 512:128:64
# 4.595; with 2 blocks ahead at 8 warps not co-resident): the sum does not bound the tile. The sweep's defaults,
# after the baseline, are the whole tall tiles (one load each), never timed and unlikely to gain after session 16.
psweep=${PSWEEP:-128:128:128:8:1:0.875:64:2:resident,256:256:64:8:1:0.875:64:2:resident,\
256:256:64:4:1:0.875:64:2:resident}
configs=benchmarks/configs/h200_partials.json
sets=${SETS:-$configs}  # per-site tilings timed side by side (session 12 timed h200_tile_acc.json beside it: a loss)
left() { local l=$((end - SECONDS - 5)); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
stage() {  # stage NAME LIMIT COMMAND...: run under min(LIMIT, time left), log to OUT/NAME.log
  local name=$1 limit; limit=$(left "$2"); shift 2
  [[ $stages == *,${name%_[0-9]*},* ]] || return 0  # ncu_0, ncu_1, ...: stage ncu
  echo "== $name $(date -u +%T) limit ${limit}s"
  [ "$limit" -lt 20 ] && { echo "skipped: no time left" | tee "$out/$name.log"; return 0; }
  timeout -k 5 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "rc=$rc" >> "$out/$name.log"
  tail -25 "$out/$name.log"
  return $rc
}
# The default -k leaves out the single-layer cases of the tilings no longer timed (compact at 1 per SM and masked,
# passed in sessions 10-14; acc 'dot', passed in session 15), so the tests fit in about 4-5 minutes; TESTS_K=gpu
# runs all.
stage watchdog 90 python3 -m pytest -q -p no:cacheprovider -k "gpu and watchdog" tests/test_persistent_layer.py
stage tests 420 python3 -m pytest -q -p no:cacheprovider \
  -k "${TESTS_K:-gpu and not default and not masked and not dot} and not watchdog" \
  tests/test_persistent_layer.py \
  tests/test_kernels.py
[ $? -eq 124 ] && pconfigs= && echo "tests timed out: benches run without the persistent kernel"
stage wait 60 python3 -m experiments.decode.wait_cost --out="$out/wait_cost.json"
bench="python3 -m experiments.decode.bench_decode --batches=1 --attention=pallas --configs=$configs --reps=3
  --host_rows=false --config_sets=$sets"
[ -n "$pconfigs" ] && stage sweep "${SWEEP_S:-330}" $bench --models=llama3_8b --methods=teal --sparsities=0.5 \
  --persistent_configs=$psweep --out="$out/bench_llama_sweep.json"
# The fastest persistent tiling of the sweep at TEAL 50 % joins PCONFIGS for the stages below.
best=$(python3 - "$out/bench_llama_sweep.json" <<'PY' 2>/dev/null
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"]
        if r["attention"] == "persistent" and r["sparsity"] == 0.5 and r.get("ms_per_step")]  # not an error row
print(min(rows, key=lambda r: r["ms_per_step"])["persistent"] if rows else "")
PY
)
[ -n "$best" ] && [ -n "$pconfigs" ] && [[ ,$pconfigs, != *,$best,* ]] && pconfigs=$pconfigs,$best
echo "persistent configs for the model stages: ${pconfigs:-none}"
[ -n "$pconfigs" ] && stage timers "${TIMERS_S:-120}" python3 -m experiments.decode.phase_timers --models=llama3_8b \
  --sparsities=0,0.5,0.65,0.999 --persistent_configs="${PTIMERS:-${best:-${pconfigs%%,*}}}" --out="$out/phase_timers.json"
ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -1)
i=0
for item in $(echo "${NCU:-${best:-${pconfigs%%,*}}@0.5}" | tr , ' '); do
  stage ncu_$i 110 "$ncu_bin" --clock-control none --kernel-name regex:persistent --launch-count 1 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters --export "$HOME/ncu_$i" \
    python3 -m experiments.decode.phase_timers --models=llama3_8b --sparsities="${item#*@}" \
    --persistent_configs="${item%@*}" --reps=1 && [ -f "$HOME/ncu_$i.ncu-rep" ] \
    && "$ncu_bin" --import "$HOME/ncu_$i.ncu-rep" --page source --csv --print-source sass \
    | gzip > "$out/ncu_${i}_source.csv.gz"  # the report (2.5 MB) stays on the machine
  i=$((i + 1))
done
regs() {  # regs SPEC...: registers / spills of each spec's layer kernel (ptxas -v on XLA's PTX dump)
  local ptxas i=0 c
  ptxas=$(command -v ptxas || ls /usr/local/cuda*/bin/ptxas 2> /dev/null | head -1)
  for c in "$@"; do
    i=$((i + 1))
    echo "## $c"
    XLA_FLAGS="--xla_dump_to=$HOME/regs_$i" timeout 80 python3 -m experiments.decode.phase_timers \
      --models=llama3_8b --sparsities=0.5 --reps=1 --persistent_configs="$c" --out="$HOME/regs_$i.json" > /dev/null
    grep -l persistent_layer "$HOME/regs_$i"/*.ptx | while read -r f; do
      "$ptxas" -v -arch=sm_90a "$f" -o /dev/null 2>&1 | grep -A3 "entry function '[^']*persistent"
    done
  done
}
export -f regs
regs_specs=${REGS:-$psweep}
stage regs 240 bash -c 'regs "$@"' regs ${regs_specs//,/ }
# The per-phase profile: the same kernel launched once per phase (persistent_<phase> kernels in the trace), at
# the sweep's fastest tiling (its mode and split fields filled in, split set to true, acc kept).
phased=$(python3 -c "import sys; p = sys.argv[1].split(':'); p += ['compact', 'false'][len(p) - 8:]
p[9] = 'true'; print(':'.join(p))" "${best:-256:32:256:4:2:0.875:64:2}")
stage phases 150 python3 -m experiments.decode.profile_decode --models=llama3_8b --variants=dense,teal:0.5 \
  --persistent=${PPHASES:-$phased} --out="$out/profile_phases.json"
stage llama 280 $bench --models=llama3_8b --methods=teal --sparsities=0,0.5,0.65,0.999 \
  --persistent_configs=$pconfigs --out="$out/bench_llama.json"
stage qwen 200 $bench --models=qwen25_7b --methods=teal --sparsities=0,0.5,0.65,0.999 \
  --persistent_configs=$pconfigs --out="$out/bench_qwen.json"
stage wina 200 $bench --models=llama3_8b --methods=wina --sparsities=0.5,0.65 \
  --persistent_configs=$pconfigs --out="$out/bench_llama_wina.json"
echo "== done $(date -u +%T)"
