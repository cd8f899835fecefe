#!/usr/bin/env bash
# The research loop on one H200 (device tool), issue 28: the loop benchmark, then the paper's protocol grid
# (top-k; dense, TEAL, TEAL-Transform, CATS, WINA, WINA-Transform uniform and TEAL / WINA / both transforms
# greedy, at 25 / 40 / 50 / 65 %) for SmolLM2-135M, Qwen2.5-Coder-1.5B and Gemma-3-270M, at a declared
# precision.
#
#   experiments/quality/run_protocol_h200.sh bench                 # bench_loop -> $OUT/bench_loop_h200*.json
#   experiments/quality/run_protocol_h200.sh part FILE             # copy .gpu/FILE (one chunk) to ~/parts/
#   experiments/quality/run_protocol_h200.sh start MODEL DEADLINE  # assemble, check, start MODEL's jobs detached
#   experiments/quality/run_protocol_h200.sh poll                  # progress; ~/runs -> $OUT/runs.tgz
#
# MODEL: smol | qwen | gemma. Inputs made on a CPU machine (the GPU image has no tokenizer data, datasets or
# gguf): .gpu/smol.part0{0,1}, .gpu/qwen.part00..20, .gpu/gemma.part00..04 (`split -b 55000000 -d -a 2` of
# the GGUFs), the bundles .gpu/smol-l1000.npz, .gpu/qwen-l300.npz and .gpu/gemma-l1000.npz (`sweep
# --only_bundle`, commands in results/sweep/README.md), the gguf wheel in .whl/. The machine keeps ~ (not the repo copy) while it stays warm (30 s after a call), so
# `start` copies the repo to ~/repo and the jobs run from there, detached, writing ~/runs/MODEL/PREC/topk-ALLOC.
# Grid at TF32 (time); float32 re-runs dense / TEAL / WINA at 50 / 65 % (the verdict check). Each job: one
# sweep process (--seeds=2, perplexity re-runs only); jobs run in a few detached chains per model (one job
# after another in a chain) and start no cell after DEADLINE seconds from `start`. The cells committed under
# results/sweep/protocol/ are seeded into ~/runs first, so a rerun computes only the missing ones. The top-k
# impl is $TOPK_IMPL or the backend's default (masks are identical either way).
set -u
stage=$1
shift
OUT=${OUT:-/tmp/out}
case $stage in
  bench)
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    python3 -m experiments.quality.bench_loop --precisions=float32 --impls=radix,sort \
      --out="$OUT/bench_loop_h200_float32.json" 2>&1 | grep -v "^W\|^I1"
    python3 -m experiments.quality.bench_loop --precisions=tf32,bfloat16 --impls=radix --select_shapes= \
      --out="$OUT/bench_loop_h200_tf32_bf16.json" 2>&1 | grep -v "^W\|^I1"
    ;;
  part)
    mkdir -p ~/parts && cp ".gpu/$1" ~/parts/ && ls ~/parts | wc -l ;;
  start)
    model=$1 end=$(( $(date +%s) + $2 ))  # no job starts a new cell after END (now + DEADLINE seconds)
    mkdir -p ~/models ~/runs ~/repo
    case $model in
      smol) file=SmolLM2-135M-Instruct.Q4_1.gguf size=98362432 sha="" dir=smollm2 ;;
      qwen) file=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf size=1117320768 sha=cc324af070c2ecbf dir=qwen1.5b ;;
      gemma) file=gemma-3-270m-q4_k_m.gguf size=253113024 sha=a5fd3b62230aa5ec dir=gemma3-270m ;;
      *) echo "unknown model $model: smol | qwen | gemma" >&2; exit 2 ;;
    esac
    cat ~/parts/$model.part* > ~/models/$file
    [[ $(stat -c %s ~/models/$file) == "$size" ]] || { echo "bad size of $file" >&2; exit 1; }
    [[ -z $sha ]] || sha256sum ~/models/$file | grep -q "^$sha" || { echo "bad sha256 of $file" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --target ~/site .whl/*.whl 2>&1 | tail -1
    export PYTHONPATH=~/site
    [[ -d ~/repo/wina_jax ]] || { tar --exclude=./.gpu -cf - . | tar -xf - -C ~/repo && mkdir -p ~/repo/.gpu; }
    cp .gpu/*.npz ~/repo/.gpu/ && ln -sf ~/models/$file ~/repo/.gpu/$file
    # Finished cells (committed under results/sweep/protocol/) are seeded, so a rerun only adds missing ones.
    shopt -s nullglob  # a model with no committed cells yet seeds nothing
    for d in results/sweep/protocol/$dir/*/topk-*/cells; do
      rel=${d#results/sweep/protocol/$dir/}
      mkdir -p ~/runs/$model/"$rel" && cp -n "$d"/*.json ~/runs/$model/"$rel"/ 2>/dev/null
    done
    cd ~/repo
    impl=${TOPK_IMPL:-}  # 2026-12-02: radix:8 (fastest on [4096, 8960] alone; per layer radix:16 is)
    echo "top-k impl: ${impl:-backend default}"
    export JAX_COMPILATION_CACHE_DIR=~/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
    export XLA_PYTHON_CLIENT_PREALLOCATE=false WINA_JAX_CACHE=off
    common=(--model=.gpu/$file --tasks=piqa,hellaswag,arc_easy,arc_challenge --seq_len=512 --ppl_windows=64
            --calib_windows=8 --mode=topk --buckets=64,128,256,512 --seeds=2 --noseed_tasks --topk_impl=$impl)
    all="--sparsities=0.5,0.65,0.25,0.4"
    uni="tf32 uniform dense,teal,cats,wina" f32="float32 uniform dense,teal,wina" gre="tf32 greedy teal,wina"
    # Jobs: "PRECISION ALLOCATION METHODS MEM_FRACTION FLAGS..." and the chain (slot) each runs in; a chain
    # runs its jobs one after another. GPU memory per job (XLA_PYTHON_CLIENT_MEM_FRACTION of 139 GiB): a job
    # holds the params twice (the perturbed re-runs) plus logit batches, and every transformed copy it made;
    # Qwen needs ~16 GB, ~22 GB transformed. Jobs whose cells are all committed exit before loading the model.
    case $model in
      qwen) common+=(--bundle=.gpu/qwen-l300.npz --limit=300 --batch_tokens=2048 --ppl_batch=4)
            # the long pole: every job in its own chain, each transformed method alone (a job keeps every
            # transformed copy it made: both in one job ran out of 0.21 of the GPU, 2026-12-02)
            jobs=("$uni 0.16 $all" "tf32 uniform teal-transform 0.25 $all" "tf32 uniform wina-transform 0.25 $all"
                  "$gre 0.16 $all --max_effective=0.7" "tf32 greedy teal-transform 0.21 $all --max_effective=0.7"
                  "tf32 greedy wina-transform 0.21 $all --max_effective=0.7" "$f32 0.16 --sparsities=0.5,0.65")
            slots=(1 2 3 4 5 6 7) ;;
      smol) common+=(--bundle=.gpu/smol-l1000.npz --limit=1000 --batch_tokens=4096 --ppl_batch=16)
            jobs=("$uni 0.06 $all" "tf32 uniform teal-transform,wina-transform 0.08 $all"
                  "$gre 0.06 $all --max_effective=0.7" "tf32 greedy teal-transform,wina-transform 0.08 $all --max_effective=0.7"
                  "$f32 0.06 --sparsities=0.5,0.65")
            slots=(1 2 3 4 1) ;;
      gemma) common+=(--bundle=.gpu/gemma-l1000.npz --limit=1000 --batch_tokens=2048 --ppl_batch=4)
             # 262k-entry vocabulary: 2.1 GB logit batches. Greedy TEAL / WINA first, then the float32 check.
             jobs=("$gre 0.1 $all --max_effective=0.7" "$f32 0.1 --sparsities=0.5,0.65" "$uni 0.1 $all"
                   "tf32 uniform teal-transform,wina-transform 0.12 $all"
                   "tf32 greedy teal-transform,wina-transform 0.12 $all --max_effective=0.7")
             slots=(1 1 2 2 3) ;;
    esac
    for slot in $(printf '%s\n' "${slots[@]}" | sort -u); do
      chain=""
      for i in "${!jobs[@]}"; do
        [[ ${slots[$i]} == "$slot" ]] || continue
        read -r prec alloc methods frac rest <<<"${jobs[$i]}"
        out=~/runs/$model/$prec/topk-$alloc
        mkdir -p "$out/logs"
        chain+="left=\$(( $end - \$(date +%s) )); (( left > 60 )) && XLA_PYTHON_CLIENT_MEM_FRACTION=$frac python3 -m \
          experiments.quality.sweep ${common[*]} --precision=$prec --allocation=$alloc --methods=$methods $rest \
          --out=$out --deadline_s=\$left >$out/logs/${methods//,/_}.log 2>&1 < /dev/null; "
      done
      setsid nohup bash -c "$chain" >/dev/null 2>&1 < /dev/null &
    done
    sleep 2; echo "started ${#jobs[@]} $model jobs in $(printf '%s\n' "${slots[@]}" | sort -u | wc -l) chains" ;;
  poll)
    for f in ~/runs/*/*/*/logs/*.log; do echo "$f: $(tr '\r' '\n' < "$f" | grep -E '@|cells|Error|error' | tail -1)"; done
    echo "cells: $(ls ~/runs/*/*/*/cells 2>/dev/null | grep -c json)"; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
    tar czf "$OUT/runs.tgz" -C ~ runs ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
