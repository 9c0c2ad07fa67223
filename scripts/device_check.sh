#!/usr/bin/env bash
# `ffcv-imagenet check` on a lent GPU machine, as one device-tool call. On your machine, first:
#   ../shared/device/stage.sh imagenette-128
# then call the device tool with carry [".devkit"] and the command
#   source .devkit/on-device.sh && devkit_install_project && scripts/device_check.sh
# It runs the full check with Imagenette and the 5-epoch preset, and leaves under $OUT/check/
# check.json, check.md and the preset run's log.jsonl, params.json and env.json (its checkpoint
# is removed: at most 8 files of 16 MiB come back). Commit them as results/gpu/<date>-<gpu>/.
# Rehearse on the CPU with the same script: OUT=/tmp/rehearse DEVKIT_DATA=/some/folder
# scripts/device_check.sh --check.quick (DEVKIT_DATA/imagenette-128 must hold train/ and val/).
set -uo pipefail
out="${OUT:-check_out}/check"
data="${DEVKIT_DATA:-../shared/data}/imagenette-128"
python3 -m ffcv_imagenet.cli check --check.out="$out" --check.data="$data" \
    --check.preset=imagenette_configs/in128_rn50_5_epochs.yaml "$@"
status=$?
rm -f "$out/preset_run/checkpoint.pt" "$out/preset_run/checkpoint.prev.pt"
exit "$status"
