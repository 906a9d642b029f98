#!/bin/bash
# One device call for issue 11: install wheels, build the ops, then (in priority order) whole-process
# timings (naive script, otherview exec cold/warm), the exact null, the load-vs-read figure and an
# import profile. Each stage has its own time limit; results go under $OUT.
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - T0) )); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OTHERVIEW_GIT_SHA=${OTHERVIEW_GIT_SHA:-speed}
python3 - <<'PY' > $OUT/setup.log 2>&1
import glob, importlib.util, subprocess, sys
always = ("diffusers", "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "click", "typing_extensions")
mods = {"matplotlib": "matplotlib", "contourpy": "contourpy", "cycler": "cycler", "fonttools": "fontTools",
        "kiwisolver": "kiwisolver", "pyparsing": "pyparsing", "python_dateutil": "dateutil", "six": "six", "importlib_metadata": "importlib_metadata", "zipp": "zipp"}
pick = []
for w in sorted(glob.glob(".whl/*.whl")):
    name = w.split("/")[-1].split("-")[0].lower()
    if name in always or importlib.util.find_spec(mods.get(name, name)) is None:
        pick.append(w)
print("installing", pick)
subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                "--no-cache-dir", "--upgrade", "--target", "/tmp/site"] + pick, check=True)
PY
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L >> $OUT/setup.log
MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { tail -20 $OUT/build.log; }
python3 -c "import otherview.ops as o, torch; print('ops', o.compiled_available(), o.has_kernel('unit_sumsq_', 'cuda'))"
echo "setup done at $(( $(date +%s) - T0 )) s"
# 1. whole processes
timeout $(left 470) python3 benchmarks/bench_plantain.py --processes --model builtin:klein-4b \
    --variants naive,cold:auto,cold:on,warm:on,warm:auto --cache /tmp/ovcache --runs /tmp/ovruns --timeout 240 \
    > $OUT/processes.log 2>&1
tail -12 $OUT/processes.log
echo "processes done at $(( $(date +%s) - T0 )) s"
# 2. import profile of exec's startup (the page cache is warm by now)
python3 -X importtime -c "import otherview.interpreter, diffusers.pipelines.flux2.pipeline_flux2_klein" 2> $OUT/importtime.log
sort -t'|' -k2 -n $OUT/importtime.log | tail -8
( time python3 -m otherview --help > /dev/null ) 2>&1 | grep real
# 3. load straight onto the GPU vs reading the bytes
timeout $(left 585) python3 benchmarks/bench_load.py --old > $OUT/load.log 2>&1
tail -5 $OUT/load.log
echo "all done at $(( $(date +%s) - T0 )) s"
