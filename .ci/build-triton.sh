#!/usr/bin/env bash
# Builds a CPU Triton Inference Server for the tests into $TRITON_HOME (default artifacts/triton, git-ignored):
#   server/   tritonserver 2.51.0, unpacked from the nvidia-pytriton 0.7.0 wheel (not installed: only its binary)
#   backends/onnxruntime/   Triton's onnxruntime backend (r24.10) compiled here against the libonnxruntime that
#             the venv's onnxruntime wheel ships, so Triton runs the same onnxruntime build as rtk.
# Sources: $TRITON_SRC (default ../shared/triton/src), else a clone of the four repositories at r24.10.
# Prints one line and exits 1 when something it needs is missing. A second run with the same inputs does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
HOME_DIR=${TRITON_HOME:-artifacts/triton}
PYTRITON=nvidia-pytriton==0.7.0
BRANCH=r24.10

die() { echo "build-triton: $*" >&2; exit 1; }

ort_lib() {
    "$PY" - <<'EOF'
import glob, os, onnxruntime
libs = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.1.*")))
print(libs[-1] if libs else "")
EOF
}

sources() {
    if [ -n "${TRITON_SRC:-}" ]; then
        [ -d "$TRITON_SRC/onnxruntime_backend" ] || die "TRITON_SRC=$TRITON_SRC has no onnxruntime_backend/"
        echo "$TRITON_SRC"; return
    fi
    if [ -d ../shared/triton/src/onnxruntime_backend ]; then echo "$(cd ../shared/triton/src && pwd)"; return; fi
    local clone="$HOME_DIR/src"
    mkdir -p "$clone"
    for repo in onnxruntime_backend backend core common; do
        [ -d "$clone/$repo" ] || git clone -q --depth 1 -b "$BRANCH" \
            "https://github.com/triton-inference-server/$repo" "$clone/$repo" 2>/dev/null \
            || die "no Triton sources: set TRITON_SRC, or provide ../shared/triton/src (cloning $repo failed)"
    done
    [ -f "$clone/include/onnxruntime_c_api.h" ] \
        || die "no onnxruntime_c_api.h: put onnxruntime's C API header in $clone/include/"
    echo "$(cd "$clone" && pwd)"
}

need_rapidjson() {
    [ -f /usr/include/rapidjson/document.h ] && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -qq rapidjson-dev >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq rapidjson-dev >/dev/null 2>&1; } \
            || die "rapidjson-dev could not be installed with apt-get"
    else
        die "rapidjson headers missing: apt-get install rapidjson-dev"
    fi
}

unpack_server() {
    [ -x "$HOME_DIR/server/pytriton/tritonserver/bin/tritonserver" ] && return
    local wheel_dir; wheel_dir=$(mktemp -d)
    "$PY" -m pip download -q --no-deps "$PYTRITON" -d "$wheel_dir" >/dev/null 2>&1 \
        || die "could not download $PYTRITON from the package index"
    rm -rf "$HOME_DIR/server.tmp" && mkdir -p "$HOME_DIR/server.tmp"
    "$PY" -m zipfile -e "$wheel_dir"/nvidia_pytriton-*.whl "$HOME_DIR/server.tmp/all"
    mv "$HOME_DIR/server.tmp/all/pytriton" "$HOME_DIR/server.tmp/all/nvidia_pytriton.libs" "$HOME_DIR/server.tmp/"
    rm -rf "$HOME_DIR/server.tmp/all" "$wheel_dir"
    chmod +x "$HOME_DIR/server.tmp/pytriton/tritonserver/bin/tritonserver"
    rm -rf "$HOME_DIR/server" && mv "$HOME_DIR/server.tmp" "$HOME_DIR/server"
}

build_backend() {
    local src=$1 ort=$2 out="$HOME_DIR/backends/onnxruntime" obj="$HOME_DIR/obj"
    local stamp; stamp="$(basename "$ort") $(cd "$src" && cat onnxruntime_backend/src/*.cc backend/src/*.cc \
        common/src/*.cc | sha256sum | cut -c1-16)"
    [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ] && return
    need_rapidjson
    mkdir -p "$obj"
    local inc="-I$src/onnxruntime_backend/src -I$src/backend/include -I$src/core/include -I$src/common/include -I$src/include"
    local files=(onnxruntime_backend/src/onnxruntime.cc onnxruntime_backend/src/onnxruntime_loader.cc
        onnxruntime_backend/src/onnxruntime_utils.cc backend/src/backend_common.cc
        backend/src/backend_input_collector.cc backend/src/backend_memory.cc backend/src/backend_model_instance.cc
        backend/src/backend_model.cc backend/src/backend_output_responder.cc common/src/async_work_queue.cc
        common/src/error.cc common/src/thread_pool.cc)
    # TRITON_ENABLE_GPU stays undefined: a CPU-only backend. Two compilers at a time: CI has 2 cores.
    printf '%s\n' "${files[@]}" | xargs -P "$(nproc)" -I{} sh -c \
        'g++ -std=c++17 -O2 -fPIC '"$inc"' -c "'"$src"'/{}" -o "'"$obj"'/$(basename {} .cc).o"' \
        || die "compiling the onnxruntime backend failed"
    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    cp "$ort" "$out.tmp/"
    ln -s "$(basename "$ort")" "$out.tmp/libonnxruntime.so.1"
    ln -s "$(basename "$ort")" "$out.tmp/libonnxruntime.so"
    cp "$(dirname "$ort")/libonnxruntime_providers_shared.so" "$out.tmp/"
    g++ -shared -o "$out.tmp/libtriton_onnxruntime.so" "$obj"/*.o \
        -Wl,--version-script="$src/onnxruntime_backend/src/libtriton_onnxruntime.ldscript" \
        -Wl,-rpath,'$ORIGIN' -L"$out.tmp" -l:libonnxruntime.so.1 -lpthread \
        || die "linking the onnxruntime backend failed"
    echo "$stamp" > "$out.tmp/.stamp"
    rm -rf "$out" && mv "$out.tmp" "$out"
}

command -v g++ >/dev/null || die "g++ missing: apt-get install g++"
[ -x "$PY" ] || die "$PY missing: run make install first"
ORT=$(ort_lib); [ -n "$ORT" ] || die "onnxruntime's libonnxruntime.so.1.* not found in the venv"
SRC=$(sources)
mkdir -p "$HOME_DIR"
start=$(date +%s)
unpack_server
build_backend "$SRC" "$ORT"
echo "build-triton: $HOME_DIR ready ($(( $(date +%s) - start )) s)"
