#!/usr/bin/env bash
# The llama.cpp benchmark anchor's runtime (benchmarks/anchors/llamacpp.py): llama-cpp-python, built
# from source into .venv (about half an hour on two busy cores). Never needed by the tests.
#
# Built for the CPU's SIMD extensions explicitly rather than with GGML_NATIVE: a native build on a
# CPU that reports AMX also compiles llama.cpp's AMX kernels, which crash (SIGSEGV in
# ggml_backend_amx_mul_mat) in VMs that report AMX without granting it. Where that is no concern,
# LLAMACPP_CMAKE_ARGS="-DGGML_NATIVE=ON" builds for this CPU as llama.cpp would by default.
# The alternative for a build that crashes: NUDGEFAST_LLAMACPP_EXTRA_BUFTS=0 at bench time (also
# turns off llama.cpp's repacked weight layouts).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run scripts/install.sh first" >&2; exit 1; }
flags=""
have() { grep -qw "$1" /proc/cpuinfo; }
have avx2 && flags+=" -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
have avx512f && flags+=" -DGGML_AVX512=ON"
have avx512_vbmi && flags+=" -DGGML_AVX512_VBMI=ON"
have avx512_vnni && flags+=" -DGGML_AVX512_VNNI=ON"
have avx512_bf16 && flags+=" -DGGML_AVX512_BF16=ON"
have avx_vnni && flags+=" -DGGML_AVX_VNNI=ON"
export CMAKE_ARGS="${LLAMACPP_CMAKE_ARGS:--DGGML_NATIVE=OFF$flags -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF} -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
echo "CMAKE_ARGS=$CMAKE_ARGS"
# --no-cache-dir: pip's wheel cache does not key on CMAKE_ARGS
.venv/bin/pip install --no-cache-dir "llama-cpp-python${LLAMACPP_VERSION:-==0.3.36}"
.venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
