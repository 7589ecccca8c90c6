#!/bin/bash
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1 || { cat $OUT/pip.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
FILES=$(python3 -c "import sys; sys.path.insert(0, 'recipes'); from gpu_check import gpu_test_files; print(' '.join(gpu_test_files()))")
for i in 1 2 3; do timeout 100 python3 -m pytest $FILES -m gpu -q -p no:cacheprovider -n 0 -rA 2>&1 | tail -18 | tee $OUT/gpu_tests_$i.log; done
