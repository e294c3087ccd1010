#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a bare GPU machine without network: install the wheels carried in .whl/ (the
# versions this project is tested with) and this checkout into /tmp, then run the check; extra arguments go to
# gpu_check.py. Results: $OUT/results.json (rewritten after every section) and $OUT/log.txt.
#   bash benchmarks/device_check.sh --autotune
set -o pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-.}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/nbp . || exit 1
PYTHONPATH=/tmp/nbp:/tmp/site python3 benchmarks/gpu_check.py --output "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
