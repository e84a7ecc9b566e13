#!/bin/bash
# Bundle what benchmarks/gpu_check.py needs on a GPU machine that has python3 3.12 + torch + nvcc but no TVM compiler.
#
#   bash benchmarks/gpu_bundle.sh ARTDIR BUNDLE [MODEL...]   # here: copy code, TVM's runtime, artifacts into BUNDLE
#   cd BUNDLE && bash go.sh art                               # there: install the runtime into /tmp/site, run, $OUT
#
# ARTDIR holds folders written by `gpu_check.py prepare`; MODEL names pick some (default: all). The TVM wheel is
# py3-none, so its Python package travels as is, minus libtvm_compiler.so (250 MB, compiler only) and the C++
# sources; apache-tvm-ffi is CPython-specific and travels as its cp312 wheel (PIP_DOWNLOAD=1 fetches it into
# BUNDLE; otherwise put it there). The device tool moves at most 64 MiB per call: fp32 ResNet-18 alone is 48 MB.
set -euo pipefail
ART=$1 BUNDLE=$2
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SITE=$(python -c "import os, tvm; print(os.path.dirname(os.path.dirname(tvm.__file__)))")
mkdir -p "$BUNDLE/art"
cp -r "$ROOT"/passes "$ROOT"/frontend "$ROOT"/backends "$ROOT"/examples "$ROOT"/benchmarks "$BUNDLE"/
find "$BUNDLE" -name __pycache__ -prune -exec rm -rf {} +
(cd "$SITE" && tar --exclude=tvm/lib/libtvm_compiler.so --exclude=tvm/3rdparty --exclude=tvm/src \
    --exclude=tvm/include --exclude=__pycache__ -czf "$BUNDLE/tvm_rt.tgz" tvm apache_tvm-*.dist-info)
if [ "${PIP_DOWNLOAD:-0}" = 1 ]; then
  FFI=$(python -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))")
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d "$BUNDLE" "apache-tvm-ffi==$FFI"
fi
if [ $# -eq 0 ]; then cp -r "$ART"/* "$BUNDLE/art/"; else for m in "$@"; do cp -r "$ART/$m" "$BUNDLE/art/"; done; fi
cat > "$BUNDLE/go.sh" <<'EOF'
#!/bin/bash
# usage (in the bundle): bash go.sh DIR...   each DIR holds gpu_check.py artifacts; logs and JSON go to $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ./*.whl || exit 1
tar -xzf tvm_rt.tgz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw --format=csv
for d in "$@"; do
  timeout 500 python3 benchmarks/gpu_check.py run "$d" 2>&1 | tee -a "$OUT/log.txt"
  cp "$d/results.json" "$OUT/results-$(basename "$d").json" 2>/dev/null
done
EOF
du -sh "$BUNDLE"
