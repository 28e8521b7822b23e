#!/usr/bin/env bash
# First device call: versions, then config A (full, lora, frozen), a profile and HLO of 4-layer A, inference.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L
python3 -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
python3 -m benchmarks.train_step --config A --modes full,lora,frozen --steps 10 --warmup 3 --timeout 240 --out $OUT/train_A_probe.json
for m in full lora; do
  python3 -m benchmarks.train_step --worker --mode $m --config A --override '{"n_layers": 4}' --steps 3 --warmup 2 \
    --hlo $OUT/$m.hlo.txt --profile $OUT/prof_$m | tail -c 300
done
python3 -m benchmarks.inference --config A --modes merged,unmerged,merge,copy --timeout 200 --out $OUT/infer_A_probe.json
ls -la $OUT
