#!/usr/bin/env bash
# The prepared GPU check, for a session that the device tool lends an accelerator (one GPU, no internet;
# /work/.library/device/README.md). In under 8 minutes, from the repository root:
#   1. the tiny recipe on cuda in bf16 through its rendered files (dpoc build, preprocess.sh, launch.sh);
#   2. the tiny MoE recipe on cuda with grouped GEMM (torch._grouped_mm) through its launch.sh, whose node script
#      runs the device check (`dpoc preflight BUILD --device`: every kernel against the CPU, one layer's step);
#   3. the layouts that fit one GPU (micro-batch 1 and 8, recompute full and selective, packing, the
#      precomputed reference), each against step 1 and 2 of run 1 (bench/_gpu_check.py);
#   4. bench/dpo_vs_trl.py on the same GPU (fp32; micro-batch 8 and packing, 3 rounds).
# Its figures go under $OUT (or a new temporary folder): summary.json (each step's exit code and seconds),
# env.txt, tiny.log, moe.log, layouts.log, layouts.json, dpo_vs_trl.log, dpo_vs_trl.json. A failed step does not stop
# the later ones; the exit code is 1 when any failed.
#
#   bench/gpu_check.sh [--wheels DIR] [--dry]
#
# --wheels DIR: install the wheels bench/gpu_wheels.sh prepared (--no-deps, into a temporary folder put first on
# PYTHONPATH after this checkout). --dry: on the CPU with no GPU (CI runs it: bench/test_gpu_check.py): the same
# steps and code paths at tiny sizes, with the cpu device, gloo and fp32 instead of cuda, NCCL and bf16.
# shellcheck disable=SC2329  # tiny, layouts and train run through step()
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dry=0
wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) dry=1; shift ;;
    --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1 (valid: --wheels DIR, --dry)" >&2; exit 2 ;;
  esac
done
out="${OUT:-$(mktemp -d)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
    "$wheels"/*.whl
  export PYTHONPATH="$PWD:$work/site"
fi
if ! command -v python >/dev/null; then  # the rendered scripts call `python`; some images have python3 only
  mkdir -p "$work/bin"
  ln -s "$(command -v python3)" "$work/bin/python"
  export PATH="$work/bin:$PATH"
fi

if [ "$dry" = 1 ]; then
  device=(hardware.device=cpu hardware.backend=gloo training.precision=fp32)
  grouped=(parallelism.moe_grouped_gemm=false)  # the cpu has no grouped GEMM
  precision=fp32
  bench=(--smoke)
else
  device=(hardware.device=cuda hardware.backend=nccl training.precision=bf16)
  grouped=(parallelism.moe_grouped_gemm=true)
  precision=bf16
  bench=(--device cuda --threads 4 --micro-batches 8 --packed 8 --rounds 3)
fi
common=(recipes/tiny_cpu.yaml "${device[@]}" hardware.devices_per_node=1 training.warmup_iters=0
  training.lr_decay_style=constant "dataset.output_prefix=$work/data/orca_tiny")

steps=()
failed=0
step() {  # NAME COMMAND...: run it (its output also in $out/NAME.log), record its exit code and seconds; a
  # failure does not stop the check. Under `||` bash ignores set -e, so the steps return on failure themselves
  local name="$1" started status=0
  shift
  started=$SECONDS
  echo "== $name" >&2
  "$@" > >(tee "$out/$name.log") 2>&1 || status=$?
  steps+=("\"$name\": {\"exit\": $status, \"seconds\": $((SECONDS - started))}")
  if [ "$status" -ne 0 ]; then
    failed=1
    echo "== $name failed (exit $status)" >&2
  fi
}
train() {  # NAME ITERS OVERRIDE...: build the tiny recipe with these overrides and run its launch.sh
  local name="$1" iters="$2"
  shift 2
  python -m dpoc build "${common[@]}" "training.train_iters=$iters" "run_dir=$work/runs/$name" "$@" \
    --out "$work/build/$name" >/dev/null || return
  bash "$work/build/$name/launch.sh"
}
tiny() {
  python -m dpoc build "${common[@]}" "run_dir=$work/runs/base" --out "$work/build/preprocess" >/dev/null || return
  bash "$work/build/preprocess/preprocess.sh" || return
  train base 10
}
moe() {  # the tiny MoE recipe on one device through its launch.sh (the node script runs the device check)
  python -m dpoc build recipes/tiny_moe_cpu.yaml "${device[@]}" "${grouped[@]}" hardware.devices_per_node=1 \
    parallelism.ep=1 training.train_iters=3 training.warmup_iters=0 "dataset.output_prefix=$work/data/orca_tiny" \
    "run_dir=$work/runs/moe" \
    --out "$work/build/moe" >/dev/null || return
  bash "$work/build/moe/launch.sh"
}
layouts() {
  local names=() name
  train mbs1 3 parallelism.micro_batch_size=1 && names+=(mbs1)
  train mbs8 3 parallelism.micro_batch_size=8 && names+=(mbs8)
  train recompute-full 3 parallelism.recompute=full parallelism.recompute_method=uniform \
    parallelism.recompute_num_layers=1 && names+=(recompute-full)
  train recompute-selective 3 parallelism.recompute=selective && names+=(recompute-selective)
  train packing 3 training.packing=true && names+=(packing)
  train precomputed 3 dpo.reference=precomputed && names+=(precomputed)
  local runs=()
  for name in "${names[@]}"; do runs+=("$name=$work/runs/$name"); done
  python bench/_gpu_check.py compare --precision "$precision" --out "$out/layouts.json" "$work/runs/base" \
    "${runs[@]}" || return
  [ "${#names[@]}" -eq 6 ]
}

{
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  python -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  python -m pip list 2>/dev/null | grep -i -E '^(torch|transformers|megatron|trl|datasets|accelerate) ' || true
} >"$out/env.txt" 2>&1
step tiny tiny
step moe moe
step layouts layouts
step dpo_vs_trl python bench/dpo_vs_trl.py "${bench[@]}" --out "$out/dpo_vs_trl.json"
printf '{"dry": %s, "steps": {%s}}\n' "$dry" "$(IFS=,; echo "${steps[*]}")" >"$out/summary.json"
cat "$out/summary.json"
exit "$failed"
