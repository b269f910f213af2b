#!/usr/bin/env bash
# The binary-network runs of benchmarks/binary.py on one GPU (issue 14): the 3 × 3 sensitivity grids and
# the longer distillation runs, several runs at a time. Needs Fashion-MNIST under $LOWBIT_DATA and the
# cached float models in runs/bench-binary/.cache (else each is trained first). Tables go to $OUT.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 LOWBIT_DATA=${LOWBIT_DATA:-.devdata} OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
B="python3 benchmarks/binary.py --models birealnet --skip-timing --device cuda --no-progress"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# a short run of each kind first: a failure costs seconds, not the whole lease
$B --seeds 0 --qat-epochs 0.05 --optimizers cema --no-grid --tag=-cudasmoke --out "$OUT/smoke.md" \
  >"$OUT/smoke.log" 2>&1 || { tail -40 "$OUT/smoke.log"; exit 1; }
echo "smoke passed"; grep "^| cema" "$OUT/smoke.md"
$B --seeds 0 --optimizers adam bop cema --grid-only --jobs 8 --out "$OUT/binary_grid.md" >"$OUT/grid.log" 2>&1 &
$B --seeds 0 1 --qat-epochs 10 --optimizers adam cema --no-grid --jobs 4 --tag=-e10 \
  --out "$OUT/binary_e10.md" >"$OUT/e10.log" 2>&1 &
$B --seeds 0 1 --qat-epochs 10 --optimizers adam cema --no-grid --kd-only --kd-weight 10 --jobs 2 --tag=-e10kd10 \
  --out "$OUT/binary_e10_kd10.md" >"$OUT/e10kd10.log" 2>&1 &
wait
for f in grid e10 e10kd10; do echo "== $f"; tail -25 "$OUT/$f.log"; done
