#!/usr/bin/env bash
# The GPU check of docs/BENCHMARKS.md (benchmarks/gpu_check.py): versions, the train step in
# float32 and bfloat16 at the defaults and at the paper's shapes, the PyTorch step on the same
# GPU, a short demo training and its mIoU, into one JSON and a Markdown table; under 8 minutes.
#
#   benchmarks/gpu_check.sh [--out DIR] [--torch-python PY] [--budget-s 450]
#   benchmarks/gpu_check.sh --dry-run [--out DIR]   # CPU, tiny shapes (tests/test_benchmarks.py)
#
# Python: $PYTHON, else the repository's .venv, else python3.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" && -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; fi
python="${python:-python3}"
exec "$python" "$repo/benchmarks/gpu_check.py" "$@"
