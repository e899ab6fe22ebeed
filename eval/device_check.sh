#!/usr/bin/env bash
# The GPU checks of the Triton kernels and the speed bench, as one short command on a CUDA machine
# (no test depends on it; CI has no GPU). From the repository root:
#
#   bash eval/device_check.sh            # results into $OUT (or /tmp/vtoken_device when unset)
#
# It installs vtoken without the network (a machine that cannot fetch: wheels of newer releases
# carried in .whl/ are installed first, e.g. transformers>=5.23 with `pip download --no-deps
# --only-binary=:all: -d .whl transformers==5.24.0` for that machine's Python), then runs
#   1. eval/bench_kernels.py: every Triton kernel compiled, checked against its PyTorch reference
#      at every size and timed beside it and the eager full-map route (bfloat16 by default on CUDA);
#   2. eval/bench_speed.py --device cuda on the LLaVA-1.5 shape: the prefill of every wrapped method
#      (SDPA) against the same model unwrapped, its oracle and its replay, and batch-8/16 generate.
# Commit what comes back under eval/results/bench_kernels/ and eval/results/bench_speed/, with the
# machine named in each file (the scripts write it).
set -o pipefail
OUT=${OUT:-/tmp/vtoken_device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
python3 -c "import torch, transformers, triton, vtoken; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
    | tee "$OUT/versions.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/versions.txt" 2>&1
status=0
python3 eval/bench_kernels.py --out "$OUT/cuda.md" --overwrite 2>&1 | tee "$OUT/bench_kernels.log" || status=1
python3 eval/bench_speed.py --device cuda --threads 8 --rounds 3 --out "$OUT/speed_cuda.md" --overwrite \
    --note 'device check (eval/device_check.sh)' 2>&1 | tail -n 200 > "$OUT/bench_speed.log" || status=1
exit $status
