#!/usr/bin/env bash
# Set-up and entry point for a fresh Debian/Ubuntu machine with Python 3.
#   ./quickstart.sh demo [ARGS...]   install what is missing, then run the demo
#   ./quickstart.sh test [ARGS...]   install what is missing, then run the test suite
# Each step is skipped when already done, so a second run starts in seconds.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV="$ROOT/.venv"
STAMP="$VENV/.installed"

need_apt=()
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
if command -v pkg-config >/dev/null 2>&1; then
    pkg-config --exists libturbojpeg || need_apt+=(libturbojpeg0-dev)
    pkg-config --exists libjpeg || need_apt+=(libjpeg-dev)
    pkg-config --exists opencv4 || pkg-config --exists opencv || need_apt+=(libopencv-dev)
else
    need_apt+=(libturbojpeg0-dev libjpeg-dev libopencv-dev)
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    need_apt+=("python3-venv")
fi
if ! command -v gcc >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then need_apt+=(build-essential); fi
if ! python3 -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    need_apt+=(python3-dev)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "[quickstart] installing system packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Reinstall when pyproject.toml or the C decoder changed since the last install.
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] \
        || [ ffcv_imagenet/_jpegcrop.c -nt "$STAMP" ]; then
    echo "[quickstart] creating $VENV and installing ffcv-imagenet[ffcv,test] (first time: about 2 minutes)"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
    # ffcv's setup.py imports numpy/pkgconfig-era tooling; build it against the venv's packages.
    "$VENV/bin/pip" install -q numpy "Cython<3.2"
    "$VENV/bin/pip" install -q --no-build-isolation -e ".[ffcv,test]"
    touch "$STAMP"
fi

cmd="${1:-demo}"; shift || true
case "$cmd" in
    demo) exec "$VENV/bin/ffcv-imagenet" demo "$@" ;;
    test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *) echo "usage: $0 {demo|test} [ARGS...]" >&2; exit 2 ;;
esac
