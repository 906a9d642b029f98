#!/bin/bash
# One device call for the speed issue (about 6.5 minutes on an H100): install the carried wheels,
# build the ops, then
#   1. `otherview exec` as the machine ships (there: torch and sympy without bytecode), empty caches
#      then warm (the warm run reads the bytecode cache the first one wrote);
#   2. with the machine's site-packages byte-compiled as pip leaves an install: the naive script,
#      `otherview exec` with empty then warm caches, and the exact null on the last run's values;
#   3. loading a save_pretrained folder straight onto the GPU against reading its files.
# Rows go to $OUT/*.jsonl; each stage has its own time limit.
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OTHERVIEW_GIT_SHA=${OTHERVIEW_GIT_SHA:-speed}
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/setup.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L >> $OUT/setup.log
MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { tail -20 $OUT/build.log; exit 1; }
echo "setup done at $(( $(date +%s) - T0 )) s; PYTHONDONTWRITEBYTECODE=$PYTHONDONTWRITEBYTECODE"
SP=$(python3 -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
echo "torch bytecode files: $(find $SP/torch -name '*.pyc' | wc -l)"
timeout 200 python3 benchmarks/bench_plantain.py --processes --model builtin:klein-4b --variants cold:auto,warm:auto \
  --cache /tmp/ovc1 --runs /tmp/r1 --timeout 150 --out $OUT/shipped.jsonl > $OUT/shipped.log 2>&1
tail -5 $OUT/shipped.log
python3 -m compileall -q -j 16 $SP > /dev/null 2>&1
timeout 330 python3 benchmarks/bench_plantain.py --processes --model builtin:klein-4b --variants naive,cold:auto,warm:auto \
  --cache /tmp/ovc2 --runs /tmp/r2 --timeout 150 --out $OUT/compiled.jsonl > $OUT/compiled.log 2>&1
tail -7 $OUT/compiled.log
timeout $(( 585 - ($(date +%s) - T0) )) python3 benchmarks/bench_load.py > $OUT/load.log 2>&1
tail -4 $OUT/load.log
echo "all done at $(( $(date +%s) - T0 )) s"
