#!/usr/bin/env bash
# Everything a lent GPU (the `device` tool: one H100/H200, torch 2.11 + Triton 3.6, no
# fbgemm_gpu, no network) can check, in one call of a few minutes:
#
#     run(command="bash bench/gpu_session.sh", timeout_s=570)
#
# then copy $OUT/*.txt into bench/results/ and commit them. Each step has its own time
# limit so that one slow step cannot eat the others' (the limits add up to 530 s, the steps
# in order of what matters most if time runs short); a failing step is reported and the
# script goes on. Nothing is installed: fxrec runs from the checkout (PYTHONPATH).
set -u
OUT=${OUT:-/tmp/fxrec_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # a step cut by its time limit still leaves the lines it printed

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "   exit $? after $((SECONDS - t0))s; last lines:"
    tail -n 5 "$OUT/$name.txt" | sed 's/^/   | /'
}

step environment 20 python -c "
import torch, triton, sys
print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**30, 'GiB')
try:
    import fbgemm_gpu  # noqa: F401
    print('fbgemm_gpu importable')
except Exception as e:
    print('fbgemm_gpu not importable:', type(e).__name__)
"
# The kernels against the bandwidth floor and against torch (issue #6's table).
step kernels_gpu 180 python bench/kernels.py
# Triton launch configurations side by side: which defaults to keep.
step kernels_sweep 100 python bench/kernels.py --sweep
# The fused training step op by op on the device: where its time goes.
step profile_gpu 45 python bench/profile_step.py
# Quantized inference: Triton's int8/int4/fp16 lookups against the floor, a DLRM lowered.
step inference_gpu 55 python bench/inference.py
# One rank per GPU (the -x2/-x4/-x8 kinds lend several): with two or more, NCCL's collectives
# really run, in the sharded equivalence tests (tests/test_shard_nccl.py) and the example.
GPUS=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 1)
RANKS=$(( GPUS > 4 ? 4 : (GPUS < 1 ? 1 : GPUS) ))
echo "== $GPUS GPU(s): $RANKS rank(s) for the sharded steps"
# The GPU-marked tests (kernels on CUDA, sparse types and metrics on CUDA; NCCL equivalence
# with 2+ GPUs, skipped with one).
step gpu_tests 60 python -m pytest -q -m gpu tests/test_lowering_kernels.py tests/test_sparse.py tests/test_metrics.py \
    tests/test_kernel_bounds.py tests/test_quant_triton.py tests/test_inference.py tests/test_compile_backend.py tests/test_shard_nccl.py
# fxrec.shard on the GPU(s): CUDA placement and kernels; NCCL collectives with 2+ ranks.
step shard_gpu 40 python -m torch.distributed.run --nproc-per-node "$RANKS" examples/dlrm_train.py --shard \
    --steps 100 --val-batches 10
# The planner's profile of this machine under NCCL (one rank: HBM bandwidth only).
# (the topology file is printed into the step's output: at most 8 files come back from the device)
step calibrate_gpu 30 sh -c "python -m fxrec.cli bench calibrate --world-size $RANKS --backend nccl -o /tmp/topology_gpu.json && cat /tmp/topology_gpu.json"
echo "results in $OUT"
