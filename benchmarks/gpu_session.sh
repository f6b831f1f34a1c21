#!/usr/bin/env bash
# The GPU measurements, run on the H200 machine from the checkout's root with .gpu (made by
# ../shared/gpu/prepare.sh) carried; writes results under $OUT. docs/GPU.md records what they gave.
#   bash benchmarks/gpu_session.sh engine      # build, load-order probe, engine vs llama-batched-bench (~8 min)
#   bash benchmarks/gpu_session.sh calibrate   # on the same machine afterwards: the GPU profile (~8 min)
#   bash benchmarks/gpu_session.sh validate    # build if needed, validate the profile at three loads
#   bash benchmarks/gpu_session.sh split       # where a decode step's host time goes (bare-loop variants)
#   bash benchmarks/gpu_session.sh repro       # the medium-load CUDA error with llama.cpp's log, launches blocking
#   bash benchmarks/gpu_session.sh pack        # the CUDA build as <=15 MiB parts under $OUT (carry it next time)
#   bash benchmarks/gpu_session.sh servecal    # full grid with its samples, then serving steps of a synthetic
#                                              # workload (continuous, chunked) for `calibrate --refit GRID --refit ...`
#   bash benchmarks/gpu_session.sh valsamples  # validate the Azure slice at 30/70/120 req/s, both policies, steps kept
#   bash benchmarks/gpu_session.sh newprofile  # the product path: calibrate (grid + serving steps) with its samples
#   PROFILE=P bash benchmarks/gpu_session.sh valnew    # validate P at 30/70/120 req/s, no speed probes, both policies
#   PROFILE=P bash benchmarks/gpu_session.sh valprobe  # the same with speed probes (POLICIES= to pick)
#   bash benchmarks/gpu_session.sh kvdata      # long-queue serving steps + the Azure validation (continuous), steps kept
#   bash benchmarks/gpu_session.sh kvprofile   # calibrate with the overloaded serving run; validate it (continuous)
#   bash benchmarks/gpu_session.sh kvcheck     # then, same lease: chunked, the long-queue loads, the main job
#   bash benchmarks/gpu_session.sh final       # calibrate, then validate its profile: Azure slice (both policies), long queues
#   bash benchmarks/gpu_session.sh kvrange     # decodes and a prompt over a ~98k-cell KV range, measured vs priced
#   bash benchmarks/gpu_session.sh mainjob     # the README's main job on the GPU with the bundled profile
# A build packed by `pack` (and the sources, vocab and wheels beside it) carried as .gpub skips the 4-minute build.
set -uo pipefail
OUT=${OUT:-results/gpu}; mkdir -p "$OUT"; W=/tmp/w; T=8
export PYTHONUNBUFFERED=1
GPU_DIR=.gpu
if [ -d .gpub ]; then  # a build packed by an earlier lease (pack), carried with the sources, vocab and wheels
  GPU_DIR=.gpub
  [ -f $W/build/bin/libllama.so ] || { mkdir -p $W && cat .gpub/build.tgz.part-* | tar xzf - -C $W && echo "unpacked the carried build"; }
fi
SHAPES=${SHAPES:-llama3-8b} GPU_DIR=$GPU_DIR bash $GPU_DIR/build.sh 2>&1 | tail -8 || exit 1
source $W/env.sh
M8=$W/llama3-8b.gguf; M1=$W/llama3.2-1b.gguf; BB=$W/build/bin/llama-batched-bench
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader

validate_loads() {  # $1: result name; $2: flags of every policy's run; $3: chunked's own; $4 = samples: keep real steps
  local profile=${PROFILE:-backends/data/h200-llama3-8b-f16.json} rates=${RATES-30,70,120} dirs="" pol flags
  for pol in ${POLICIES:-continuous chunked}; do
    flags="$2"
    [ "$pol" = chunked ] && flags="$flags $3"
    [ -n "$rates" ] && flags="$flags --rates $rates"
    [ "${4:-}" = samples ] && flags="$flags --samples $OUT/$1-$pol.jsonl"
    timeout ${VAL_S:-240} python3 -m sim.cli validate --profile "$profile" --model "$M8" --policy "$pol" $flags \
      --no-wakeup-probe --repeats 3 --no-plots --out "$W/$1-$pol" 2>&1 | grep -v '^llama\|^load' \
      | grep '^load\|mean\|p90\|p99\|passed\|missed\|probe\|steps written' | tee "$OUT/$1-$pol.txt"
    dirs="$dirs $1-$pol"
  done
  tar czf "$OUT/$1.tgz" -C $W $dirs
}
new_profile() {  # $1: timeout default. The product path: calibrate (grid + serving runs) with its samples; the
  # profile also goes to $W/new.json for the modes that validate it in the same lease
  timeout ${CAL_S:-$1} python3 -m sim.cli calibrate --model "$M8" --n-gpu-layers 99 --threads $T --repeats 3 \
    --out "$OUT/h200-llama3-8b-f16.json" --samples "$OUT/grid-serving.jsonl" 2>&1 | grep -v '^llama\|^load' | tail -32 \
    | tee "$OUT/calibrate.txt"
  cp "$OUT/h200-llama3-8b-f16.json" $W/new.json
}
main_job() {  # the README's main job on the GPU with PROFILE (default: the bundled one)
  timeout ${MAIN_S:-140} python3 -m sim.cli compare --backend llama --device cuda --model "$M8" \
    --cost ${PROFILE:-backends/data/h200-llama3-8b-f16.json} --llama-option n_ctx=262144 --llama-option n_seq_max=256 \
    --llama-option n_batch=8192 --llama-option n_ubatch=512 --llama-option kv_unified=true --llama-option n_threads=$T \
    --limit 200 --time-scale 0.06 --probe-requests 0 --no-plots --out "$OUT/main" 2>&1 | grep -v '^llama\|^load' \
    | tail -40 | tee "$OUT/main.txt"
}
longq_loads() {  # the synthetic long-queue loads (25-140 req/s, 300 requests, continuous), steps kept
  local profile=${PROFILE:-backends/data/h200-llama3-8b-f16.json}
  local syn="--num-requests 300 --prompt-len lognormal:120,1.0 --output-len lognormal:24,0.9 --shared-prefix 32 --prefix-groups 4 --seed 1"
  timeout ${SERVE_S:-110} python3 -m sim.cli validate --profile $profile --model "$M8" --policy continuous \
    --rates 25,60,100,140 --repeats 1 --probe-requests 0 --no-wakeup-probe --no-plots $syn \
    --samples "$OUT/longq-continuous.jsonl" --out $W/longq 2>&1 | grep -v '^llama\|^load' \
    | grep 'steps written\|mean\|^load' | tee "$OUT/longq.txt"
  tar czf "$OUT/longq.tgz" -C $W longq
}
case "${1:-engine}" in
engine)
  python3 -c 'import numpy, sys; print("numpy", numpy.__version__, sys.version.split()[0])'
  timeout 200 python3 -m benchmarks.load_order_probe "$M1" --json-out "$OUT/load_order.json"
  timeout 150 cuda-gdb -batch -ex run -ex bt -ex 'info sharedlibrary' --args python3 -c "import numpy.linalg
import llama_cpp as L
p = L.llama_model_default_params(); p.n_gpu_layers = 0
L.llama_model_load_from_file(b'$M1', p)" > "$OUT/crash_backtrace.txt" 2>&1
  grep -n -A25 'SIGSEGV\|signal' "$OUT/crash_backtrace.txt" | head -60
  timeout 330 python3 -m benchmarks.bench_decode --model "$M8" --n-gpu-layers 99 --threads $T \
    --batch-sizes 1,4,16,32,64,128 --prompt-tokens 128 --gen-tokens 128 --sampling both --engine --no-bare \
    --repeats 2 --batched-bench "$BB" --json-out "$OUT/bench_decode_8b.json" 2>&1 | grep -v '^llama\|^load\|^print_info' \
    | tee "$OUT/bench_decode_8b.txt"
  ;;
calibrate)
  timeout 120 python3 -m benchmarks.load_order_probe "$M8" --n-gpu-layers 0 --json-out "$OUT/load_order2.json"
  timeout ${CAL_S:-330} python3 -m sim.cli calibrate --model "$M8" --n-gpu-layers 99 --threads $T --quick --repeats 3 \
    --out "$OUT/h200-llama3-8b-f16.json" --samples "$OUT/h200-samples.jsonl" 2>&1 | grep -v '^llama\|^load' \
    | tail -40 | tee "$OUT/calibrate.txt"
  ;;
split)
  timeout ${SPLIT_S:-240} python3 -m benchmarks.bench_decode --model "$M8" --n-gpu-layers 99 --threads $T \
    --batch-sizes 1,16,64,128 --prompt-tokens 128 --gen-tokens 128 --sampling host --split --repeats 2 \
    --batched-bench "$BB" --json-out "$OUT/split_8b.json" 2>&1 | grep -v '^llama\|^load\|^print_info' \
    | tee "$OUT/split_8b.txt"
  ;;
repro)
  P=${PROFILE:-backends/data/h200-llama3-8b-f16.json}
  TOKENSTEP_LLAMA_LOG=1 CUDA_LAUNCH_BLOCKING=1 timeout ${REPRO_S:-150} python3 -m sim.cli validate --profile "$P" \
    --model "$M8" --policy chunked --rates ${REPRO_RATE:-55.8} --repeats 1 --probe-requests 0 --no-plots \
    --out $W/repro > $W/repro.log 2>&1; echo "repro exit $?"
  grep -v '^llama_model_loader\|^print_info\|^load_tensors\|^llama_context\|^llama_kv\|^graph_\|^sched_' $W/repro.log \
    | grep -i -B3 -A12 'error\|fail\|abort' | head -80 | tee "$OUT/repro.txt"
  tail -60 $W/repro.log >> "$OUT/repro.txt"
  ;;
pack)
  tar cf - -C $W build/bin | gzip -6 | split -b 15M - "$OUT/build.tgz.part-"
  du -ch "$OUT"/build.tgz.part-* | tail -1
  ;;
servecal)
  timeout ${CAL_S:-330} python3 -m sim.cli calibrate --model "$M8" --n-gpu-layers 99 --threads $T --repeats 3 \
    --out "$OUT/h200-grid.json" --samples "$OUT/grid.jsonl" 2>&1 | grep -v '^llama\|^load' | tail -30 | tee "$OUT/calibrate.txt"
  SYN="--num-requests 300 --prompt-len lognormal:120,1.0 --output-len lognormal:24,0.9 --shared-prefix 32 --prefix-groups 4 --seed 1"
  for pol in continuous chunked; do
    timeout ${SERVE_S:-100} python3 -m sim.cli validate --profile "$OUT/h200-grid.json" --model "$M8" --policy $pol \
      --rates 25,60,100,140 --repeats 1 --probe-requests 0 --no-wakeup-probe --no-plots $SYN \
      --samples "$OUT/serving-$pol.jsonl" --out $W/serve-$pol 2>&1 | grep -v '^llama\|^load' | grep 'steps written\|^TTFT mean\|^TPOT mean\|^load:' | tee -a "$OUT/serving.txt"
  done
  ;;
newprofile)  # the product path: calibrate (grid + serving steps) with its samples
  new_profile 400
  ;;
mainjob)  # the README's main job on the GPU: static vs continuous vs no prefix sharing, with predictions
  main_job
  ;;
kvdata)  # long-queue synthetic serving steps (25-140 req/s) and the Azure validation, continuous, steps kept
  longq_loads
  POLICIES=${POLICIES:-continuous} validate_loads val "--probe-requests 0" "--max-num-batched-tokens ${BUDGET:-256}" samples
  ;;
kvprofile)  # calibrate (grid + serving runs, the overloaded one included), then validate it on the Azure slice
  new_profile 330
  PROFILE=$W/new.json POLICIES=continuous validate_loads val "--probe-requests 0" "--max-num-batched-tokens 256" samples
  ;;
final)  # one lease: calibrate (the product path), validate its profile on the Azure slice and the long-queue loads
  new_profile 300
  export PROFILE=$W/new.json VAL_S=${VAL_S:-110}
  validate_loads val "--probe-requests 0" "--max-num-batched-tokens ${BUDGET:-256}" samples
  longq_loads
  ;;
kvcheck)  # on the same lease after kvprofile: chunked on the Azure slice, the long-queue loads, the main job
  export PROFILE=${PROFILE:-$W/new.json}
  POLICIES=chunked validate_loads val "--probe-requests 0" "--max-num-batched-tokens 256" samples
  longq_loads
  main_job
  ;;
kvrange)  # steps over a wide unified-KV range (48 x 2,048-token prompts, all but the top one dropped), measured vs priced
  timeout ${KVR_S:-100} python3 -m benchmarks.kv_range_probe --model "$M8" --n-gpu-layers 99 --json-out "$OUT/kv_range.json" \
    2>&1 | grep -v '^llama\|^load\|^print_info' | tail -8 | tee "$OUT/kv_range.txt"
  ;;
valnew)  # validate PROFILE at 30/70/120 req/s without speed probes, chunked in 256-token steps, real steps kept
  validate_loads val "--probe-requests 0" "--max-num-batched-tokens ${BUDGET:-256}" samples
  ;;
valprobe)  # the same with speed probes around each load (64 requests drawn from the workload, before and after)
  validate_loads valp "" "--max-num-batched-tokens ${BUDGET:-256}"
  ;;
valsamples)  # validate at 30/70/120 req/s, no probes, both policies at the profile's budget, real steps kept
  validate_loads val "--probe-requests 0" "" samples
  ;;
validate)  # validate at the profile's 0.3x / 0.7x / 1.2x capacity, no probes
  RATES=${RATES:-} validate_loads validate "--probe-requests 0" ""
  ;;
esac
ls -la "$OUT"
