#!/usr/bin/env bash
# Write both ILSVRC2012 splits to .beton with the recommended (rn50) parameters.
#
#   ./write_imagenet.sh IMAGENET_DIR OUT_DIR [MAX_RES] [COMPRESS_PROB] [QUALITY]
#
# Defaults: MAX_RES 500 px (longer side), COMPRESS_PROB 1.0 (every image JPEG, with restart
# markers for the crop-first decoder; 0.5 = FFCV's half-raw files, 4.7x larger and, read by stock
# ffcv, slower than these: see README "Input pipeline"), QUALITY 90. Writes
#   OUT_DIR/train_<MAX_RES>_<COMPRESS_PROB>_<QUALITY>.beton  and  OUT_DIR/val_..._.beton
# each with its .meta.json. The val file reuses the train file's class list (--cfg.classes), so the
# labels of both files mean the same classes.
#
# IMAGENET_DIR holds either folders or the original archives (read in place, never unpacked):
#   train/<wnid>/*.JPEG            or  ILSVRC2012_img_train.tar  (a tar of per-class tars)
#   val/<wnid>/*.JPEG (sorted)     or  val/ILSVRC2012_val_*.JPEG (flat)  or  ILSVRC2012_img_val.tar
# A flat val folder or the val tar needs LOC_val_solution.csv (Kaggle) or val.txt
# ('<filename> <class index>' lines, indices into the sorted wnids) in IMAGENET_DIR.
# Environment: NUM_WORKERS (default 0 = all cores), PYTHON (default: python3, the one with
# ffcv-imagenet's dependencies, e.g. the project's .venv/bin/python).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

if [ $# -lt 2 ] || [ $# -gt 5 ]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
IMAGENET_DIR=$1
OUT_DIR=$2
MAX_RES=${3:-500}
COMPRESS_PROB=${4:-1.0}
QUALITY=${5:-90}
NUM_WORKERS=${NUM_WORKERS:-0}
# The project's virtual environment (./quickstart.sh creates it) unless PYTHON says otherwise.
DEFAULT_PYTHON=python3
[ -x "$HERE/../.venv/bin/python" ] && DEFAULT_PYTHON=$HERE/../.venv/bin/python
WRITE_CMD=("${PYTHON:-$DEFAULT_PYTHON}" "$HERE/write_imagenet.py")

# A split's input: its folder, else its original archive (ILSVRC2012_img_<split>.tar).
split_input() {
    if [ -d "$IMAGENET_DIR/$1" ]; then
        echo "$IMAGENET_DIR/$1"
    elif [ -f "$IMAGENET_DIR/ILSVRC2012_img_$1.tar" ]; then
        echo "$IMAGENET_DIR/ILSVRC2012_img_$1.tar"
    else
        echo "write_imagenet.sh: no $IMAGENET_DIR/$1 folder or ILSVRC2012_img_$1.tar" >&2
        return 1
    fi
}
TRAIN_INPUT=$(split_input train) || exit 1
VAL_INPUT=$(split_input val) || exit 1

# The val labels, unless val is already sorted into class folders.
VAL_LABELS=()
# (-print -quit rather than `| grep -q`: under pipefail, find's SIGPIPE would read as "none")
if [ -f "$VAL_INPUT" ] || [ -z "$(find "$VAL_INPUT" -mindepth 1 -maxdepth 1 -type d -print -quit)" ]; then
    for labels in LOC_val_solution.csv val.txt; do
        if [ -f "$IMAGENET_DIR/$labels" ]; then
            VAL_LABELS=("--cfg.val_labels=$IMAGENET_DIR/$labels")
            break
        fi
    done
    if [ ${#VAL_LABELS[@]} -eq 0 ]; then
        echo "write_imagenet.sh: $VAL_INPUT is not sorted into class folders and" \
             "$IMAGENET_DIR has no LOC_val_solution.csv or val.txt" >&2
        exit 1
    fi
fi

mkdir -p "$OUT_DIR"
NAME=${MAX_RES}_${COMPRESS_PROB}_${QUALITY}
TRAIN_BETON=$OUT_DIR/train_$NAME.beton
COMMON=(--cfg.max_resolution="$MAX_RES" --cfg.write_mode=proportion
        --cfg.compress_probability="$COMPRESS_PROB" --cfg.jpeg_quality="$QUALITY"
        --cfg.num_workers="$NUM_WORKERS")

run() {
    echo "+ $*"
    "$@"
}

run "${WRITE_CMD[@]}" --cfg.split=train --cfg.data_dir="$TRAIN_INPUT" \
    --cfg.write_path="$TRAIN_BETON" "${COMMON[@]}"
# val.txt indices refer to the sorted train wnids, which the train file's metadata records.
run "${WRITE_CMD[@]}" --cfg.split=val --cfg.data_dir="$VAL_INPUT" ${VAL_LABELS[@]+"${VAL_LABELS[@]}"} \
    --cfg.classes="$TRAIN_BETON" --cfg.write_path="$OUT_DIR/val_$NAME.beton" "${COMMON[@]}"
