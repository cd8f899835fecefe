"""Flag-free tools of the speed experiments (`experiments/decode/`, `experiments.quality.bench_loop`): model
shapes (`shapes`), sparsifier set-up and kept-weight bytes (`decode_setup`), profiler traces (`trace`) and the
fit of step time against kept bytes (`ceiling`). Scripts import these; they define no flags."""
