#!/usr/bin/env bash
# The kernels' tests (tests/ops) on the GPU: the tests CI runs in Triton's CPU interpreter, here with the compiled
# kernels on CUDA, plus the bf16 attention cases the interpreter cannot run (its bf16 tl.dot is wrong). Where they
# run is decided in one place, tests/ops/ops_utils.py (DEVICE, DOT_DTYPES, BF16_DOT, TOL). 4 pytest-xdist workers
# share the card (small problems: the time is compilation and Python, not the GPU).
# Prints pytest's output, then one line: "op_tests: <pytest's counts> on <card>, exit <rc>"; with OUT set, the
# whole log also goes to $OUT/op_tests.log.
#
#   bash scripts/gpu/op_tests.sh                       # on the GPU, from the repo root
#   bash scripts/gpu/op_tests.sh -k bfloat16           # extra arguments go to pytest
#
# The lent GPU's image has no pytest: once per checkout, `pip download --no-deps -d .whl_test pytest pytest-xdist
# execnet pluggy iniconfig packaging` (pure-Python wheels; .gitignore names .whl_test), carry
# .whl_test, and install it in the call as .whl is (../shared/device/README.md).
set -uo pipefail  # no -e: a failing pytest still prints the summary line
source "$(dirname "$0")/header.sh"
log=$(mktemp)
[ -n "${OUT:-}" ] && mkdir -p "$OUT" && log="$OUT/op_tests.log"
log_header "op_tests: python -m pytest -q -n 4 tests/ops" | tee "$log"
# Without CUDA these tests would silently run in the interpreter (tests/conftest.py): not what this script checks.
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "op_tests: no CUDA device; on a CPU run python -m pytest tests/ops instead" | tee -a "$log"
  exit 2
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python -m pytest -q -n 4 -ra -p no:cacheprovider tests/ops "$@" 2>&1 \
  | tee -a "$log"
rc=${PIPESTATUS[0]}
# pytest's last line of counts, e.g. "2 failed, 201 passed in 95.3s (0:01:35)"
counts=$(grep -E '[0-9]+ (passed|failed|error|errors|skipped).* in [0-9.]+s' "$log" | tail -1 | tr -d '=' | xargs)
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "op_tests: ${counts:-no pytest summary} on ${card:-an unknown card}, exit $rc" | tee -a "$log"
exit "$rc"
