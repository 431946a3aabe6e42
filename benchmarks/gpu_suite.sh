#!/usr/bin/env bash
# All GPU checks in one bounded run (<= 9 minutes on one H100): JAX search (also with the
# space-to-depth stem), train, restorer and pipeline throughput, and the PyTorch peer on the same card.
# JSON goes to $OUT (or the first argument), a combined table is printed last.
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh        # QUICK=1 for a CPU smoke run
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}"  # leave room for torch
py="${PYTHON:-python3}"
# A GPU machine without network or grain: install the wheels carried in .whl/ (see the README).
if ! "$py" -c "import grain" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  site="${TMPDIR:-/tmp}/jaxdesens-site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PYTHONPATH"
fi
if [ "${QUICK:-0}" = 1 ]; then
  quick="--quick"; torch_args="--quick --device cpu"
else
  quick=""; torch_args="--device cuda"
fi
run() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  echo "=== $name: $*" >> "$out/logs.txt"
  timeout "$limit" "$@" > "$out/.current.log" 2>&1
  local rc=$?
  cat "$out/.current.log" >> "$out/logs.txt"; echo "    rc=$rc in $((SECONDS - start))s"
  [ $rc = 0 ] || tail -n 25 "$out/.current.log"
  rm -f "$out/.current.log"
}
run search "${T_SEARCH:-150}" "$py" benchmarks/search_throughput.py $quick --bf16 --chunk "${CHUNKS:-256,512}" --json "$out/search.json"
JAXDESENS_SPACE_TO_DEPTH=1 run search_s2d "${T_SEARCH_S2D:-80}" "$py" benchmarks/search_throughput.py $quick --bf16 --chunk 256 \
  --stages scoring,ebp --json "$out/search_s2d.json"
run train "${T_TRAIN:-120}" "$py" benchmarks/train_throughput.py $quick --bf16 --json "$out/train.json"
run peer_torch "${T_TORCH:-130}" "$py" benchmarks/peer_torch.py $torch_args --time_budget_s "${T_TORCH_BUDGET:-110}" --json "$out/peer_torch.json"
if [ "${QUICK:-0}" = 1 ]; then restorer_args="--quick"; else restorer_args="--preset gpu"; fi
run restorer "${T_RESTORER:-60}" "$py" benchmarks/restorer_throughput.py $restorer_args --json "$out/restorer.json"
run pipeline "${T_PIPE:-45}" "$py" benchmarks/pipeline_throughput.py $quick --images 10000 --json "$out/pipeline.json"
"$py" benchmarks/summarize.py "$out"
