#!/usr/bin/env bash
# The SmolLM2 sweeps behind results/sweep/h200 and docs/findings.md, as run on one H200 (device tool).
#
#   experiments/quality/run_h200.sh STAGE OUT DEADLINE_S [LIMIT]
#
# STAGE: main (threshold mode, uniform: the paper's methods), variants (threshold, uniform: WINA's c at
# every site, the partial transforms and the transform's null-space bases), greedy (threshold, greedy
# allocation), topk (per-token top-k, with the bases). Threshold mode calibrates each target under the sparse
# upstream (the sweep's default --upstream; cells keyed 'calibration': 'upstream').
# main and variants share OUT/threshold-uniform, so their common cells run once. Inputs, made on a CPU
# machine and carried (the GPU image has no tokenizer data, datasets or gguf wheel):
#   .gpu/SmolLM2-135M-Instruct.Q4_1.gguf   the embedded model (sha256 in docs/findings.md)
#   .gpu/l$LIMIT.npz                        python -m experiments.quality.sweep --only_bundle --bundle=.gpu/l1000.npz \
#                                             --model=.gpu/SmolLM2-135M-Instruct.Q4_1.gguf --limit=1000 \
#                                             --seq_len=512 --ppl_windows=128 --calib_windows=64
# Every cell is resumable: rerun a stage to finish what a deadline left.
set -u
stage=$1 out=$2 deadline=$3 limit=${4:-1000}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-.gpu/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
common=(--model=.gpu/SmolLM2-135M-Instruct.Q4_1.gguf --bundle=.gpu/l$limit.npz --limit=$limit --seq_len=512
        --ppl_windows=128 --calib_windows=64 --batch_tokens=65536 --ppl_batch=64 --buckets=256,1024
        --deadline_s=$deadline)
case $stage in
  main) args=(--mode=threshold --allocation=uniform --out=$out/threshold-uniform
              --methods=dense,teal,teal-transform,cats,wina,wina-transform) ;;
  variants) args=(--mode=threshold --allocation=uniform --out=$out/threshold-uniform
                  "--methods=teal,wina,wina[c_sites=all],wina-transform-attn,wina-transform-mlp,wina-transform-auto,teal-transform-auto,wina-transform[basis=axis],wina-transform[basis=learned],teal-transform[basis=axis]") ;;
  greedy) args=(--mode=threshold --allocation=greedy --out=$out/threshold-greedy
                --methods=teal,wina,teal-transform,wina-transform) ;;
  topk) args=(--mode=topk --allocation=uniform --out=$out/topk-uniform
              "--methods=teal,wina,teal-transform,wina-transform,cats,wina-transform[basis=axis],wina-transform[basis=learned]") ;;
  *) echo "unknown stage $stage: main | variants | greedy | topk" >&2; exit 2 ;;
esac
exec python3 -m experiments.quality.sweep "${common[@]}" "${args[@]}"
