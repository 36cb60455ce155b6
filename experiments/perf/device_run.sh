#!/bin/bash
# The benchmark commands behind the Performance tables of docs/performance.md, as run on the lent GPU machine
# (no network there: carried wheels go to /tmp/site). Usage: experiments/perf/device_run.sh STAGE
# Output (logs, JSON) goes to $OUT, or ./perf_out when OUT is unset.
set -o pipefail
OUT=${OUT:-perf_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:.
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-.}
bench() { local name=$1; shift; python3 -m resnet_jax.bench "$@" --json="$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" | grep -v -e "^{" -e "Delay kernel"; }
case $1 in
  env)
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
    python3 -c "import jax, flax, optax, torch, torchvision; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__); print(jax.devices())" ;;
  resnet50)
    bench resnet50 --model=resnet50 --batch_size=256 --dtype=bfloat16 --vs_torch --steps=60 ;;
  cifar)
    bench cifar --model=resnet20,resnet56 --batch_size=128,1024 --dtype=bfloat16 --source=device --steps=200 --window=20 ;;
  flags)  # one row per XLA flag setting, each in its own process
    XLA_FLAGS=--help python3 -c "import jax; jax.numpy.zeros(1)" 2>&1 | grep -A1 -E "command_buffer|graph_min_graph" | head -20
    XLA_FLAGS= bench r50_base --model=resnet50 --batch_size=256 --steps=60
    XLA_FLAGS=--xla_gpu_enable_command_buffer= bench r50_nocb --model=resnet50 --batch_size=256 --steps=60
    XLA_FLAGS= bench r50_remat --model=resnet50 --batch_size=256 --steps=60 --remat=true
    XLA_FLAGS= bench r56_base --model=resnet56 --batch_size=128 --source=device,synthetic --steps=200 --window=20
    XLA_FLAGS= bench r56_f32 --model=resnet56 --batch_size=128 --source=device --dtype=float32 --steps=200 --window=20
    XLA_FLAGS=--xla_gpu_enable_command_buffer= bench r56_nocb --model=resnet56 --batch_size=128 --source=device --steps=200 --window=20
    XLA_FLAGS=--xla_gpu_graph_min_graph_size=1 bench r56_mingraph --model=resnet56 --batch_size=128 --source=device --steps=200 --window=20 ;;
  table)  # the rows of docs/performance.md
    XLA_FLAGS=--xla_gpu_graph_min_graph_size=1 bench cifar_f32 --model=resnet20,resnet56 --batch_size=128,1024 --dtype=float32 --source=device --steps=200 --window=20
    bench resnet50_vs_torch --model=resnet50 --batch_size=256 --dtype=bfloat16 --vs_torch --steps=60 ;;
  maxbatch)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 bench maxbatch --model=resnet50 --dtype=bfloat16 --remat=false,true --max_batch ;;
  *) echo "unknown stage $1"; exit 2 ;;
esac
