#!/usr/bin/env bash
# Build upstream llama.cpp's own tools (llama-mtmd-cli, llama-quantize) from the very llama.cpp that
# the pinned llama-cpp-python vendors, so tests and benchmarks can check that our GGUF files run in
# upstream with no flags, and compare against what a user of plain llama.cpp would get.
#
#   bench/build_upstream.sh            # or: make upstream-tools
#
# Output: .cache/llama.cpp-upstream/build/bin/{llama-mtmd-cli,llama-quantize} (CPU build, static libs).
# Skips everything when both binaries exist for this version. Needs cmake (>= 3.14) and a C++17
# compiler; it installs nothing itself: if one is missing it stops and says what to install.
# Environment: PYTHON (whose pip downloads the sdist; default .venv/bin/python, else python3),
# JOBS (parallel compile jobs; default nproc), UPSTREAM_DIR (default .cache/llama.cpp-upstream).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36                       # keep in step with the llama-cpp-python pin in pyproject.toml
DIR=${UPSTREAM_DIR:-.cache/llama.cpp-upstream}
BIN=$DIR/build/bin
TOOLS=(llama-mtmd-cli llama-quantize)
STAMP=$DIR/build/.llama-cpp-python-$VERSION

have_all() {
    [ -f "$STAMP" ] || return 1
    for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done
}
if have_all; then
    echo "upstream tools for llama-cpp-python $VERSION already built in $BIN"
    exit 0
fi

die() { echo "build_upstream.sh: $*" >&2; exit 1; }

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
CMAKE=$(command -v cmake || true)
[ -n "$CMAKE" ] || [ ! -x .venv/bin/cmake ] || CMAKE=.venv/bin/cmake
[ -n "$CMAKE" ] || die "cmake not found. Install it (apt-get install cmake, or $PYTHON -m pip install cmake) and rerun."
CXX_FOUND=$(command -v "${CXX:-c++}" || command -v g++ || command -v clang++ || true)
[ -n "$CXX_FOUND" ] || die "no C++ compiler found (set CXX, or apt-get install g++) and rerun."
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip: set PYTHON to a Python with pip."

mkdir -p "$DIR/dl"
SDIST=$(ls "$DIR"/dl/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)
if [ -z "$SDIST" ]; then
    echo "downloading the llama-cpp-python $VERSION sdist"
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR/dl"
    SDIST=$DIR/dl/llama_cpp_python-$VERSION.tar.gz
    [ -f "$SDIST" ] || die "pip download did not produce $SDIST"
fi
SRC=$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    tar -xzf "$SDIST" -C "$DIR"
fi

# Only the two tools: no server, tests, examples or HTTPS (nothing here downloads models).
# LLAMA_BUILD_TOOLS/COMMON are on by default for a standalone tree; set them so that stays true.
# Static libraries make the binaries self-contained (no rpath into this build tree).
"$CMAKE" -S "$SRC" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF >"$DIR/cmake-configure.log" 2>&1 \
    || { tail -n 30 "$DIR/cmake-configure.log" >&2; die "cmake configure failed (log: $DIR/cmake-configure.log)"; }
start=$(date +%s)
"$CMAKE" --build "$DIR/build" --config Release -j "${JOBS:-$(nproc)}" --target "${TOOLS[@]}"
for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || die "build finished but $BIN/$t is missing"; done
touch "$STAMP"
echo "built ${TOOLS[*]} in $(( $(date +%s) - start ))s -> $BIN"
