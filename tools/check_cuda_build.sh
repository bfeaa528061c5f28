#!/usr/bin/env bash
# Build check of the CUDA half of dspark-native on a machine without a GPU (CI): nothing runs.
#  1. configures the torch-free core with the CUDA kernels (DSPARK_CUDA_CORE_CHECK=ON,
#     architectures sm_80 + sm_90a unless DSPARK_CUDA_ARCHITECTURES is set) and builds
#     libdspark_core; any compile or link error fails the script;
#  2. checks that libdspark_core defines the CUDA entry points of every op that has a .cu file;
#  3. syntax-checks every csrc/torch/*.cpp with -DDSPARK_WITH_CUDA=1 against the installed torch's
#     headers and the CUDA headers (the CUDA registrations a CPU-only torch build never compiles).
# Exits 0 with a short message on success, and 0 (saying it skipped) when nvcc is absent.
# Env: CUDA_HOME (default /usr/local/cuda), PYTHON (default python3), BUILD_DIR
# (default build/cuda-check), JOBS (default: nproc), DSPARK_CUDA_ARCHITECTURES.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="${CUDA_HOME}/bin/nvcc"
PYTHON="${PYTHON:-python3}"
BUILD_DIR="${BUILD_DIR:-${ROOT}/build/cuda-check}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
ARCHS="${DSPARK_CUDA_ARCHITECTURES:-80;90a}"

if [[ ! -x "${NVCC}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
    CUDA_HOME="$(cd "$(dirname "${NVCC}")/.." && pwd)"
  else
    echo "check_cuda_build: SKIPPED (no nvcc at ${CUDA_HOME}/bin/nvcc or on PATH)"
    exit 0
  fi
fi
echo "check_cuda_build: $("${NVCC}" --version | tail -n 1), archs ${ARCHS}"

# 1. configure + build the CUDA core
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
cmake -S "${ROOT}" -B "${BUILD_DIR}" "${GEN[@]}" \
  -DDSPARK_BUILD_TORCH=OFF -DDSPARK_CUDA_CORE_CHECK=ON \
  -DCMAKE_CUDA_COMPILER="${NVCC}" "-DDSPARK_CUDA_ARCHITECTURES=${ARCHS}" >"${BUILD_DIR}.configure.log" 2>&1 || {
  cat "${BUILD_DIR}.configure.log"; echo "check_cuda_build: FAILED (cmake configure)"; exit 1; }
grep -q "CUDA core ON" "${BUILD_DIR}.configure.log" || {
  cat "${BUILD_DIR}.configure.log"; echo "check_cuda_build: FAILED (CUDA core not enabled)"; exit 1; }
cmake --build "${BUILD_DIR}" --target dspark_core -j "${JOBS}" || {
  echo "check_cuda_build: FAILED (building libdspark_core with CUDA)"; exit 1; }

# 2. the CUDA entry points are defined (not left undefined) in the shared library
LIB="$(find "${BUILD_DIR}" -maxdepth 2 -name 'libdspark_core.so*' -type f | head -n 1)"
[[ -n "${LIB}" ]] || { echo "check_cuda_build: FAILED (libdspark_core.so not found)"; exit 1; }
for cu in "${ROOT}"/csrc/core/cuda/*.cu; do
  [[ -e "${cu}" ]] || continue
  op="$(basename "${cu}" .cu)"
  if ! nm -D --defined-only "${LIB}" | grep -qw "dspark_${op}_cuda"; then
    echo "check_cuda_build: FAILED (${LIB} does not define dspark_${op}_cuda)"; exit 1
  fi
done

# 3. syntax-check the CUDA half of the torch glue
if ! TORCH_INC="$("${PYTHON}" -c 'from torch.utils import cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null)"; then
  echo "check_cuda_build: core OK; torch glue check SKIPPED (cannot import torch with ${PYTHON})"
  exit 0
fi
INC=(-I"${ROOT}/csrc/include" -I"${ROOT}/csrc")
for d in ${TORCH_INC}; do INC+=(-isystem "${d}"); done
INC+=(-isystem "${CUDA_HOME}/include")
# A CPU-only torch wheel ships the c10/cuda headers but not the header its CMake generates for a
# CUDA build; supply the same one-line content (shared-library build) when it is missing.
SHIM="${BUILD_DIR}/torch-cuda-shim"
have_macros=0
for d in ${TORCH_INC}; do [[ -f "${d}/c10/cuda/impl/cuda_cmake_macros.h" ]] && have_macros=1; done
if [[ "${have_macros}" == 0 ]]; then
  mkdir -p "${SHIM}/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"${SHIM}/c10/cuda/impl/cuda_cmake_macros.h"
  INC+=(-isystem "${SHIM}")
fi
CXX_BIN="${CXX:-c++}"
n=0
for f in "${ROOT}"/csrc/torch/*.cpp; do
  [[ -e "${f}" ]] || continue
  "${CXX_BIN}" -fsyntax-only -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=1 -DDSPARK_WITH_CUDA=1 "${INC[@]}" "${f}" || {
    echo "check_cuda_build: FAILED (torch glue ${f#${ROOT}/} with DSPARK_WITH_CUDA)"; exit 1; }
  n=$((n + 1))
done
echo "check_cuda_build: OK (libdspark_core with CUDA kernels for ${ARCHS}; ${n} torch glue files syntax-checked with DSPARK_WITH_CUDA)"
