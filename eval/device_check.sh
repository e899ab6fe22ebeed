#!/usr/bin/env bash
# The GPU checks of the Triton kernels and the speed bench, as one short command on a CUDA machine
# (no test depends on it; CI has no GPU). From the repository root:
#
#   bash eval/device_check.sh            # results into $OUT (or /tmp/vtoken_device when unset)
#
# A machine that cannot fetch gets newer releases as wheels carried in .whl/ (installed first, into
# /tmp/site): transformers>=5.23 and what it needs beyond an older image, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl transformers==5.25.0 huggingface_hub==2.4.0 httpx2 httpcore2 truststore click hf-xet \
#       kernels tomlkit regex
# vtoken itself runs from this checkout (PYTHONPATH). Then, each step under its own time limit (a
# step that fails or runs out leaves the others running; the log says which):
#   1. eval/bench_kernels.py: every Triton kernel compiled, checked against its PyTorch reference at
#      every size and timed beside it and the eager full-map route (bfloat16);
#   2. eval/bench_speed.py --family llava_7b: LLaVA-1.5-7B's full shape (random weights, bfloat16,
#      SDPA), every method's prefill against the same model unwrapped, its replay and its oracle; then,
#      as a step of its own, batch-1/8/16 generate at 64 tokens;
#   3. eval/bench_speed.py on the scaled LLaVA-1.5 shape of the CPU runs (float32), for comparison.
# Commit what comes back under eval/results/bench_kernels/ and eval/results/bench_speed/, with the
# machine named in each file (the scripts write it).
set -o pipefail
OUT=${OUT:-/tmp/vtoken_device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/device_check.log"
: > "$LOG"

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output into the log
    local name=$1 limit=$2
    shift 2
    echo "== $name: start $(date +%T), limit ${limit} s" >> "$LOG"
    timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "== $name: rc=$rc at $(date +%T)" >> "$LOG"
    return $rc
}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >> "$LOG" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "wheel install failed" >> "$LOG"; exit 1; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, transformers, triton, vtoken; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
    > "$OUT/versions.txt" 2>> "$LOG" || { cat "$OUT/versions.txt" >> "$LOG"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$OUT/versions.txt" 2>&1
nproc >> "$OUT/versions.txt"

status=0
step kernels "${KERNELS_LIMIT:-120}" python3 eval/bench_kernels.py --out "$OUT/kernels_cuda.md" --overwrite || status=1
# The 7B shape in two steps, so that a step cut off by its limit (the script writes its file only at
# the end) loses only its own half: the prefills first, then the generate runs.
step speed_llava_7b "${SPEED_7B_LIMIT:-200}" python3 eval/bench_speed.py --family llava_7b --device cuda --dtype bfloat16 \
    --threads 8 --batches 0 --prefill-rounds 8 --replay-atol 1 --out "$OUT/cuda_llava_7b.md" --overwrite \
    --note 'GPU check (eval/device_check.sh), prefills; replay against method compared with --replay-atol 1 (bfloat16 logits).' \
    || status=1
step speed_llava_7b_generate "${SPEED_7B_GENERATE_LIMIT:-130}" python3 eval/bench_speed.py --family llava_7b --device cuda \
    --dtype bfloat16 --threads 8 --budgets 64 --prefill-rounds 1 --rounds 2 --profile none --replay-atol 1 \
    --out "$OUT/cuda_llava_7b_generate.md" --overwrite \
    --note 'GPU check (eval/device_check.sh), generate at batch 1, 8 and 16; one prefill round (see cuda_llava_7b.md).' \
    || status=1
step speed_scaled "${SPEED_SCALED_LIMIT:-120}" python3 eval/bench_speed.py --device cuda --threads 8 --rounds 3 \
    --prefill-rounds 10 --out "$OUT/cuda.md" --overwrite --note 'GPU check (eval/device_check.sh).' || status=1
exit $status
