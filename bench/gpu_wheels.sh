#!/usr/bin/env bash
# Prepares, here, the wheels bench/gpu_check.sh carries to a lent GPU machine, which has no internet: its image
# holds torch (CUDA), transformers, accelerate, peft, safetensors, jinja2, numpy, pandas, pyarrow and the like
# (/work/.library/device/KINDS.md), not megatron-core, omegaconf, jsonschema, trl or datasets. Each is fetched
# at the version installed here (the one the tests and benchmarks ran with), as a wheel for the device's
# Python 3.12 on x86-64, without dependencies (gpu_check.sh installs them with --no-deps); a package with no
# such wheel is built into one here. Keep DIR inside the checkout and ignored by git (.git/info/exclude), and
# name it in the device tool's `carry`.
#
#   bench/gpu_wheels.sh DIR [PYTHON]     # PYTHON: whose versions to fetch (default: python3 on PATH)
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: bench/gpu_wheels.sh DIR [PYTHON]" >&2
  exit 2
fi
dir="$1"
python="${2:-python3}"
# what the device image lacks: dpoc's own dependencies, the runtime's, and the bench extra's
packages=(megatron-core omegaconf jsonschema jsonschema-specifications referencing rpds-py trl datasets dill
  multiprocess)
pins=()
for name in "${packages[@]}"; do
  version="$("$python" -c 'import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))' "$name")"
  pins+=("$name==$version")
done
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
  manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
mkdir -p "$dir"
for pin in "${pins[@]}"; do
  if ! "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$dir" "$pin"; then
    echo "gpu_wheels.sh: no Python 3.12 x86-64 wheel of $pin; building one here (pure Python only)" >&2
    "$python" -m pip wheel -q --no-deps -w "$dir" "$pin"
  fi
done
ls "$dir"
du -sh "$dir"
