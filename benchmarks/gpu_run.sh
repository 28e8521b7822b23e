#!/usr/bin/env bash
# The H100 runs behind benchmarks/results/*.json. Usage: bash benchmarks/gpu_run.sh {main|extra}
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
export XLA_FLAGS="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_autotune ${XLA_FLAGS:-}"
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
T="python3 -m benchmarks.train_step --steps 10 --warmup 3 --parallel"
I="python3 -m benchmarks.inference --steps 20 --warmup 3 --parallel"
if [ "$1" = final ]; then
  timeout 150 $T --config A --modes full,lora,lora_concat,frozen --timeout 140 --out $OUT/train_A.json
  timeout 95 $I --config A --modes merged,unmerged,unmerged_concat --timeout 85 --out $OUT/inference_A.json
  timeout 105 $T --config A --remat --modes full,lora --timeout 95 --out $OUT/train_A_remat.json
  timeout 75 $T --config A --scan --modes full,lora --timeout 65 --out $OUT/train_A_scan.json
  timeout 110 python3 -m benchmarks.train_step --config llama8b --modes lora --steps 4 --warmup 1 --timeout 100 --out $OUT/train_llama8b_lora.json
  timeout 45 python3 -m benchmarks.train_step --config llama8b --modes full --steps 2 --warmup 1 --timeout 40 --out $OUT/train_llama8b_full.json
elif [ "$1" = extra ]; then
  python3 -c "import jax, jax.numpy as jnp; j = jax.make_jaxpr(lambda x: jax.lax.scan(lambda c, y: (c + y, c), 0.0, x))(jnp.ones(3)); print('SCAN PARAMS', j.eqns[0].primitive.name, sorted(j.eqns[0].params))"
  timeout 60 python3 -m benchmarks.train_step --worker --config tiny --scan --mode lora --steps 1 --warmup 0 2>&1 | grep -v "^[WI][0-9]" | tail -25
  timeout 110 $T --config B --modes full,lora,lora_concat --timeout 100 --out $OUT/train_B_concat.json
  timeout 110 $T --config A --remat --modes full,lora_concat --timeout 100 --out $OUT/train_A_remat_concat.json
elif [ "$1" = main ]; then
  timeout 200 $T --config A --modes full,lora,lora_plain,nnx,merge,frozen --timeout 180 --out $OUT/train_A.json
  timeout 150 $I --config A --timeout 130 --out $OUT/inference_A.json
  timeout 150 $T --config B --modes full,lora,lora_plain,nnx,merge,frozen --timeout 130 --out $OUT/train_B.json
else
  timeout 140 $T --config A --remat --modes full,lora,frozen --timeout 120 --out $OUT/train_A_remat.json
  timeout 100 $T --config A --scan --modes full,lora,frozen --timeout 90 --out $OUT/train_A_scan.json
  timeout 150 python3 -m benchmarks.train_step --config llama8b --modes lora --steps 5 --warmup 2 --timeout 140 --out $OUT/train_llama8b_lora.json
  timeout 100 python3 -m benchmarks.train_step --config llama8b --modes full --steps 3 --warmup 1 --timeout 90 --out $OUT/train_llama8b_full.json
fi
ls -la $OUT
