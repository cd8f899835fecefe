#!/usr/bin/env bash
# The decode-speed runs behind benchmarks/results (issue 6), as run on one H200 (device tool):
#
#   experiments/decode/run_decode_h200.sh OUT STAGE [STAGE ...]
#
# Stages run in order, each under its own time limit, writing OUT/<stage>.log and its JSON:
#   tests   the GPU kernel tests (tests/test_kernels.py -k gpu)
#   sweep   experiments.decode.kernel_sweep on the Llama-3-8B and Qwen-2.5-7B site shapes -> OUT/kernel_sweep.json
#   bench   experiments.decode.bench_decode, batch 1, teal and wina at 0 / 0.5 / 0.65, with the sweep's tilings
#           (OUT/kernel_sweep.json if the sweep ran, over the committed benchmarks/configs/h200_partials.json)
#   full    experiments.decode.bench_decode, every variant, batch 1-8 (the table of decode_h200.md)
#   attn_tests    the GPU tests of the decode-attention and sparse GEMV kernels (Triton kernels vs XLA on the
#                 real shapes; tests/test_decode_attention.py and tests/test_kernels.py, -k gpu)
#   attn          bench_decode with XLA and the Pallas decode attention in one run (--attention=xla,pallas),
#                 batch 1, 2, 4, 8, dense, teal and wina -> OUT/bench_decode_attn.json
#   attn_sweep    experiments.decode.attention_sweep: XLA attention vs the kernel's heads_per_program and warps,
#                 per layer -> OUT/attention_sweep.json
#   dense_at      bench_decode, Llama-3-8B shape, batch 1, teal at 0 / 50 / 65 % with the sparse kernels'
#                 dense fallback off (2), at 0.875 and at 0.6 -> OUT/bench_decode_dense_at.json
#   step          bench_decode with the Pallas decode attention and the configs' dense fallback: batch 1, 2, 4,
#                 8, dense, teal and wina at 0 / 50 / 65 % (batch > 1: 50 %) -> OUT/bench_decode_step.json
#   norm          bench_decode, batch 1, teal and wina at 0 / 50 / 65 %, the RMSNorm prologue off and on in one run
#                 (--fuse_norm=false,true), Pallas attention -> OUT/bench_decode_norm.json
#   attn_profile  profile_decode, both attentions, dense / teal 50 / 65 % -> OUT/profile_decode_attn{,_xla}.json
#   fixed   bench_decode, Llama-3-8B shape, teal at 0 / 50 / 65 / 99.9 % (the last: the sparse kernels' fixed
#           cost, almost no weight rows kept) and profile_decode at 65 / 99.9 % -> OUT/bench_decode_fixed.json,
#           OUT/profile_decode_fixed.json
#   modes   bench_decode, Llama-3-8B shape, teal 50 / 65 %: the tilings against the kernel's 'balanced' and
#           'indexed' modes and the 'semaphore' reduce on every site, in one run -> OUT/bench_decode_modes.json
# CONFIGS (comma-separated kernel_sweep JSONs) replaces the committed tilings; MODELS the attn stage's
# model shapes; SWEEP_S, BENCH_S, FULL_S, TESTS_S (attn_tests) and ATTN_S (each other attn stage) override
# the stages' time limits (seconds), SWEEP_BUDGET the
# sweep's seconds of candidate tilings per shape.
set -u
out=$1; shift
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
configs=${CONFIGS:-benchmarks/configs/h200_partials.json}
[ -f "$out/kernel_sweep.json" ] && configs=$configs,$out/kernel_sweep.json
for stage in "$@"; do
  echo "== $stage $(date -u +%T)"
  case $stage in
    tests) timeout -k 5 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k gpu ;;
    sweep) timeout -k 5 "${SWEEP_S:-280}" python3 -m experiments.decode.kernel_sweep --budget_s="${SWEEP_BUDGET:-14}" --top=2 \
             --out="$out/kernel_sweep.json"
           [ -f "$out/kernel_sweep.json" ] && configs=${CONFIGS:-benchmarks/configs/h200_partials.json},$out/kernel_sweep.json ;;
    bench) timeout -k 5 "${BENCH_S:-200}" python3 -m experiments.decode.bench_decode --configs="$configs" --batches=1 \
             --methods=teal,wina --sparsities=0,0.5,0.65 --reps=5 --out="$out/bench_decode.json" ;;
    full) timeout -k 5 "${FULL_S:-420}" python3 -m experiments.decode.bench_decode --configs="$configs" \
            --out="$out/bench_decode_full.json" ;;
    attn_tests) timeout -k 5 "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -k gpu \
                  tests/test_decode_attention.py tests/test_kernels.py ;;
    attn) timeout -k 5 "${ATTN_S:-560}" python3 -m experiments.decode.bench_decode --configs="$configs" \
            --attention=xla,pallas --batches=1,2,4,8 --methods=teal,wina --sparsities=0,0.5,0.65 \
            --batch_sparsities=0.5,0.65 --reps=3 --models="${MODELS:-llama3_8b,qwen25_7b}" \
            --out="$out/bench_decode_attn.json" ;;
    attn_sweep) timeout -k 5 "${ATTN_S:-280}" python3 -m experiments.decode.attention_sweep \
                  --out="$out/attention_sweep.json" ;;
    dense_at) timeout -k 5 "${ATTN_S:-300}" python3 -m experiments.decode.bench_decode --configs="$configs" \
                --models="${MODELS:-llama3_8b}" --batches=1 --methods=teal --sparsities=0,0.5,0.65 --reps=5 \
                --dense_at=2,0.875,0.6 --out="$out/bench_decode_dense_at.json" ;;
    step) timeout -k 5 "${ATTN_S:-560}" python3 -m experiments.decode.bench_decode --configs="$configs" \
            --attention=pallas --batches=1,2,4,8 --methods=teal,wina --sparsities=0,0.5,0.65 \
            --batch_sparsities=0.5 --reps=3 --models="${MODELS:-llama3_8b,qwen25_7b}" \
            --out="$out/bench_decode_step.json" ;;
    norm) timeout -k 5 "${ATTN_S:-560}" python3 -m experiments.decode.bench_decode --configs="$configs" \
            --attention=pallas --batches=1 --methods=teal,wina --sparsities=0,0.5,0.65 --fuse_norm=false,true \
            --reps=5 --models="${MODELS:-llama3_8b,qwen25_7b}" --out="$out/bench_decode_norm.json" ;;
    attn_profile)
      for att in pallas xla; do
        timeout -k 5 "${ATTN_S:-280}" python3 -m experiments.decode.profile_decode --models=llama3_8b,qwen25_7b \
          --variants=dense,teal:0.5,teal:0.65 --configs="$configs" --attention=$att \
          --out="$out/profile_decode_attn$([ $att = xla ] && echo _xla).json"
      done ;;
    fixed) timeout -k 5 "${ATTN_S:-300}" python3 -m experiments.decode.bench_decode --configs="$configs" \
             --attention=pallas --models=llama3_8b --batches=1 --methods=teal --sparsities=0,0.5,0.65,0.999 --reps=3 \
             --out="$out/bench_decode_fixed.json"
           timeout -k 5 120 python3 -m experiments.decode.profile_decode --models=llama3_8b --configs="$configs" \
             --variants=teal:0.65,teal:0.999 --attention=pallas --top=30 --out="$out/profile_decode_fixed.json" ;;
    modes) c=benchmarks/configs
           timeout -k 5 "${ATTN_S:-400}" python3 -m experiments.decode.bench_decode --models=llama3_8b --batches=1 \
             --methods=teal --sparsities=0.5,0.65 --reps=3 --attention=pallas \
             --config_sets="$configs,$configs+$c/balanced_256.json,$configs+$c/indexed_256.json,$configs+$c/sweep_b_semaphore.json" \
             --out="$out/bench_decode_modes.json" ;;
    *) echo "unknown stage $stage: tests | sweep | bench | full | attn_tests | attn | attn_sweep | dense_at | step | norm | attn_profile | fixed | modes" >&2
       exit 2 ;;
  esac 2>&1 | tee "$out/$stage.log" | tail -40
done
