#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA device and the package installed:
#   1. every CUDA test of the suite (tests named *cuda*: canonicalization, cones, torch iterations, Anderson,
#      the layer), against the CPU results;
#   2. bench_layer.py on the device, one problem at a time, batches 1024 to 65536 (DIFFCP, which solves on the
#      host, up to batch 4096; MOREAU up to 16384; the first 256 instances of each batch checked against Clarabel;
#      2 warm-up rounds, not the default 5: a lent device's minutes are few);
#   3. bench_iterations.py on the device (torch SCS / OSQP steps against the C solvers).
# Each stage has its own time limit, so that one slow stage leaves the others their results; logs and JSON go to
# OUTDIR (default gpu-out), JSON rewritten after each batch size.
#
#   bash benchmarks/gpu.sh OUTDIR
set -u
out=${1:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 1

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log, print its tail
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    tail -n 8 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
$py -c "import torch, scs, osqp, cvxpy; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'scs', scs.__version__, 'osqp', osqp.__version__, 'cvxpy', cvxpy.__version__)" | tee -a "$out/gpu.txt"

stage tests 90 $py -m pytest -q -rs -k cuda tests -p no:cacheprovider
for problem in qp socp sdp; do
    stage "layer-$problem" 150 $py benchmarks/bench_layer.py --device cuda --problems "$problem" \
        --batches 1024 16384 65536 --repeats 3 --warmup 2 --threads 8 --check 256 \
        --baseline-max-batch DIFFCP=4096 MOREAU=16384 \
        --json "$out/layer-$problem.json"
done
stage iterations 60 $py benchmarks/bench_iterations.py --device cuda --families portfolio,mpc \
    --batch-sizes 1024,65536 --steps 50 --repeats 3 --c-instances 50
