#!/usr/bin/env bash
# The six hosts with and without MIST on Fashion-MNIST with the DINOv2 ViT-S/14 (56 px, 100 train / 50 test images
# per class, 5 tasks of 2 classes), seeds 1993-1995, one run at a time; a (config, seed) with a complete run is skipped.
# Usage: bash exps/demo_vit/run.sh [OUT (default runs/demo_vit)] [SEEDS (default "1993 1994 1995")]
# Then: python -m utils.report OUT/*
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-runs/demo_vit}
seeds=${2:-"1993 1994 1995"}
python=${PYTHON:-.venv/bin/python}
for seed in $seeds; do
  for host in simplecil ranpac slca ease l2p dualprompt; do
    for variant in "" _mist; do
      name=fmnist_${host}${variant}
      dir=$out/seed$seed/$name
      if grep -qs '"complete": true' "$dir"/*/*/*/results.json; then continue; fi
      mkdir -p "$dir"
      start=$(date +%s)
      "$python" main.py --config exps/demo_vit/$name.json --set "seed=$seed" --set progress=false \
        --output-dir "$dir" > "$dir/stdout.log" 2>&1
      echo "$seed $name $(( $(date +%s) - start )) s"
    done
  done
done
