#!/bin/bash
# Second lent H200 (session 16): one device call. Installs the carried wheels (.whl/, as device_run.sh), then
#   1. every gpu-marked test (the bf16 stacked/per-client simulator test had never run on a GPU),
#   2. recipes/simulate_speed.py on CUDA: stacked vs per-client simulator, 8 and 32 clients (issue 14 item 1),
#   3. the paper-setting table (sweep.py protocol --grids paper_core) from scratch with 8 jobs on the one GPU, under a
#      deadline: finished runs are kept in $OUT/regen/paper_core.jsonl, a later call runs the missing ones only.
# Copy to .whl/run.sh (docs/results/gpu_h200/session16/device_run.sh here) and call with carry [".whl"]; everything lands in $OUT.
START=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYBIN=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
export PATH=$PYBIN:$PATH
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > $OUT/pip.log 2>&1 || { cat $OUT/pip.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L; nproc
echo "setup done at $((SECONDS-START)) s"
FILES=$(python3 -c "import sys; sys.path.insert(0, 'recipes'); from gpu_check import gpu_test_files; print(' '.join(gpu_test_files()))" 2>/dev/null \
  || grep -rlE '(^\s*@|marks=\[?)pytest\.mark\.gpu\b' tests)
timeout 150 python3 -m pytest $FILES -m gpu -q -p no:cacheprovider -n 0 > $OUT/gpu_tests.log 2>&1
echo "gpu tests rc $? at $((SECONDS-START)) s"; tail -5 $OUT/gpu_tests.log
timeout 100 python3 recipes/simulate_speed.py --rounds 3 --steps 8 --flops > $OUT/speed8.log 2>&1
echo "speed8 rc $? at $((SECONDS-START)) s"; cat $OUT/speed8.log | tail -12
timeout 80 python3 recipes/simulate_speed.py --clients 32 --rounds 2 --steps 4 > $OUT/speed32.log 2>&1
echo "speed32 rc $? at $((SECONDS-START)) s"; cat $OUT/speed32.log | tail -8
mkdir -p $OUT/regen
[ -f .whl/paper_core.jsonl ] && cp .whl/paper_core.jsonl $OUT/regen/  # runs a first call finished
LEFT=$((${SWEEP_UNTIL:-540} - (SECONDS-START)))
echo "sweep start at $((SECONDS-START)) s, $LEFT s left"
OMP_NUM_THREADS=1 timeout $LEFT python3 recipes/sweep.py protocol --grids paper_core --jobs ${JOBS:-8} \
  --out $OUT/regen --runs-dir /tmp/runs > $OUT/sweep.log 2>&1
echo "sweep rc $? at $((SECONDS-START)) s; $(wc -l < $OUT/regen/paper_core.jsonl) records"; tail -5 $OUT/sweep.log
ls -la $OUT $OUT/regen
