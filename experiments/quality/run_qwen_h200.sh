#!/usr/bin/env bash
# The paper's protocol on Qwen2.5-Coder-1.5B-Instruct and SmolLM2-135M, as run on one H200 (device tool):
# top-k mode (k = round((1 - s) d) per token at every site), uniform allocation for dense / TEAL / WINA /
# WINA-Transform / TEAL-Transform / CATS at 25 / 40 / 50 / 65 %, greedy allocation at 50 % for TEAL, WINA,
# WINA-Transform and TEAL-Transform (the transform variants search on the transformed model).
# Results: results/sweep/qwen1.5b/{topk-uniform,topk-greedy}, results/sweep/smollm2-topk/{...}.
#
#   experiments/quality/run_qwen_h200.sh MODEL OUT DEADLINE_S [SWEEP_FLAG...]
#
# MODEL: qwen | smol. OUT: results folder. DEADLINE_S: each job starts no new cell after it (rerun to
# resume: every cell is a file). SWEEP_FLAGs are appended to every job's flags (later flags win). The jobs
# ($JOBS, default below: one sweep process per method group) run in parallel on the one GPU, logs in
# OUT/logs/; each takes a slice of GPU memory (no preallocation), so their compiles (CPU) overlap the
# others' GPU work. Inputs, made on a CPU machine (the GPU image has no tokenizer data, datasets or gguf):
#   .gpu/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf, .gpu/SmolLM2-135M-Instruct.Q4_1.gguf  (the models)
#   .gpu/qwen-l500.npz   python -m experiments.quality.sweep --only_bundle --bundle=.gpu/qwen-l500.npz \
#                          --model=.gpu/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --limit=500 \
#                          --tasks=piqa,hellaswag,arc_easy,arc_challenge --seq_len=512 --ppl_windows=64 \
#                          --calib_windows=8
#   .gpu/smol-l1000.npz  the same with --model=.gpu/SmolLM2-135M-Instruct.Q4_1.gguf --limit=1000
# and the gguf wheel (.whl/). How they reached the GPU (the 1.1 GB GGUF in 19 chunks) and the measured
# timings: results/sweep/README.md.
#
# Cost plan (written before the run; measured numbers in results/sweep/README.md):
# - Per cell, Qwen: perplexity on 64 x 512 held-out tokens (32 k tokens) and 4 tasks of <= 500 rows
#   (ARC-Challenge has 299): 6,885 choice sequences, 401 k tokens once padded to the buckets 64/128/256
#   (longest row 243 tokens) -> ~0.43 M tokens x 3.1 GFLOP (1.31 B block weights + 0.23 B lm_head) ~ 1.3
#   PFLOP, plus a per-token top_k (a sort) over 1,536 or 8,960 inputs at each site of 28 layers: at an
#   estimated 20-40 k tokens/s, 10-20 s of GPU per cell. SmolLM2 (1000 rows: 619 k tokens, 12x fewer
#   weights): 2-4 s.
# - Compiles: the 28 layers are unrolled and k is static in top-k mode, so every cell compiles its own
#   programs: perplexity + 3 buckets ~ 4 x 10-20 s of CPU per cell. Parallel jobs keep the GPU busy
#   while others compile.
# - Greedy search (wina_jax.sparsity.allocation.greedy): per layer, each step raises one site by
#   0.05 / w_j, i.e. the layer's effective sparsity by 0.05 / sum(w) (Qwen: sum(w) = 19.8 -> 0.0025;
#   SmolLM2: 10.7 -> 0.0047), until it reaches --max_effective=0.5 (enough for the 50 % cell): ~200
#   steps x 28 layers = 5,600 steps for Qwen, each two vmapped evaluations of 8 candidate rows (7 sites
#   + the uniform baseline) of one layer over the 8 x 512 calibration tokens (3 TFLOP, ~15 ms, plus
#   ~10 ms of host work) -> ~4 min per method on the GPU; SmolLM2 ~3,200 steps of mostly host work,
#   ~1.5 min. Hence 8 calibration windows (not 16) and greedy at 50 % only.
# - Qwen grid: 21 uniform cells ~ 21 x 15 s GPU + 4 greedy searches ~ 4 x 4 min GPU; compiles and the
#   model load (the GGUF dequantised with numpy, ~2 min) overlap in 7 parallel jobs: ~10-13 min.
#   SmolLM2: ~4-6 min. One lease: SmolLM2 runs while the Qwen GGUF's chunks travel, Qwen right after;
#   .gpu/qwen-l300.npz (--limit=300 --bundle=.gpu/qwen-l300.npz appended) is the fallback if the
#   SmolLM2 timings show the 500-row grid will not fit.
# Measured (2026-12-01, results/sweep/README.md): compile-bound, not GPU-bound. A Qwen cell took 80-270 s
# (a greedy one 324-506 s) with 7-14 jobs sharing the 16 CPU cores (load 30-60); the estimate above
# missed that by ~3x. Run one model's jobs at a time, and fewer of them per call.
set -u
model=$1 out=$2 deadline=$3
shift 3
sweep=experiments.quality.sweep
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-.gpu/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 XLA_PYTHON_CLIENT_PREALLOCATE=false
common=(--tasks=piqa,hellaswag,arc_easy,arc_challenge --seq_len=512 --ppl_windows=64 --calib_windows=8
        --mode=topk --buckets=64,128,256,512 --deadline_s=$deadline)
case $model in
  qwen) common+=(--model=.gpu/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --bundle=.gpu/qwen-l500.npz --limit=500
                 --batch_tokens=2048 --ppl_batch=4)
        mem=0.12 mem_transform=0.22      # GPU share per job (transform jobs ran out at 0.14, ran at 0.25)
        export WINA_JAX_CACHE=off ;;     # no 7 x 7 GB cache writes
  smol) common+=(--model=.gpu/SmolLM2-135M-Instruct.Q4_1.gguf --bundle=.gpu/smol-l1000.npz --limit=1000
                 --batch_tokens=8192 --ppl_batch=16)
        mem=0.08 mem_transform=0.08 ;;   # 0.04 ran out of memory
  *) echo "unknown model $model: qwen | smol" >&2; exit 2 ;;
esac
jobs=${JOBS:-"uniform:dense,teal uniform:wina uniform:wina-transform uniform:teal-transform uniform:cats
               greedy:teal,wina greedy:wina-transform,teal-transform"}
mkdir -p "$out/logs"
for job in $jobs; do
  alloc=${job%%:*} methods=${job#*:}
  case $alloc in
    uniform) sps="--sparsities=0.5,0.25,0.65,0.4" ;;     # 50 % first: the cell every comparison needs
    greedy) sps="--sparsities=0.5 --max_effective=0.5" ;;
    *) echo "unknown job $job: uniform:METHODS | greedy:METHODS" >&2; exit 2 ;;
  esac
  frac=$mem
  [[ $methods == *transform* ]] && frac=$mem_transform      # they hold the original and the rotated params
  XLA_PYTHON_CLIENT_MEM_FRACTION=$frac python3 -m $sweep "${common[@]}" --allocation=$alloc \
    --out="$out/topk-$alloc" --methods="$methods" $sps "$@" >"$out/logs/$alloc-${methods//,/_}.log" 2>&1 &
done
wait
echo "done: $(ls "$out"/topk-*/cells | grep -c json) cells in $out"
