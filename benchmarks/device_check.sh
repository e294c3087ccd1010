#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a bare GPU machine without network: install the wheels carried in .whl/ (the
# versions this project is tested with) and this checkout into /tmp, then run the check; extra arguments go to
# gpu_check.py. Results: $OUT/results.json (rewritten after every section) and $OUT/log.txt. gpu_check's time budget
# counts from here (installs included); a SIGTERM (the device call's time limit) reaches it, so it still writes
# what it measured and prints its table.
#   bash benchmarks/device_check.sh --autotune
set -o pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-.} NBP_CHECK_STARTED=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
# --upgrade: a rerun on a machine that is still warm must not keep the previous checkout's code
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/nbp . || exit 1
# tee ignores the signal (a time limit may signal the whole process group), so the check's last report still shows
PYTHONPATH=/tmp/nbp:/tmp/site python3 benchmarks/gpu_check.py --output "$OUT" "$@" \
    > >(trap "" TERM INT; exec tee "$OUT/log.txt") 2>&1 &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
wait "$pid"
rc=$?
while kill -0 "$pid" 2>/dev/null; do  # a trapped signal ends `wait` early: let the check write its report
    wait "$pid"
    rc=$?
done
exit $rc
