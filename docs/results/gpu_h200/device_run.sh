#!/bin/bash
# The command that made the figures in this folder (docs/benchmark.md, Goal 7), run from the repository root on a
# GPU machine without network access, as `bash .whl/run.sh` (second call: GOSSIP_UNTIL=0, no gossip benchmark).
# .whl/ held wheels built or downloaded elsewhere for the machine's Python 3.12: deepspeed 0.19.8 (built with
# DS_BUILD_OPS=0 pip wheel --no-deps), hjson, pydantic + pydantic-core + annotated-types + typing-inspection,
# typing_extensions, bitsandbytes 0.50.2, datasets 5.2.0 + dill + multiprocess, badam 1.4; torch, transformers and
# the rest were the machine's own. On a machine with network access, `DS_BUILD_OPS=0 pip install -e '.[test,int8]'`
# and `python recipes/gpu_check.py` is all it takes.
# Steps: install the wheels, record the machine, run recipes/gpu_check.py, then (time left) the gossip benchmark on
# the machine's 16 cores. Everything lands in $OUT.
START=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
PYBIN=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
export PATH=$PYBIN:$PATH
command -v nvcc >/dev/null && export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > $OUT/pip.log 2>&1 || { cat $OUT/pip.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L; nproc; free -g | head -2; which ninja nvcc; nvcc --version | tail -2
  python3 -c "import torch,transformers,deepspeed,bitsandbytes,datasets,pyarrow,badam; print('torch',torch.__version__,torch.version.cuda,'tf',transformers.__version__,'ds',deepspeed.__version__,'bnb',bitsandbytes.__version__,'datasets',datasets.__version__,'pyarrow',pyarrow.__version__); print(torch.cuda.get_device_name(0))"
} > $OUT/env.txt 2>&1
cat $OUT/env.txt
echo "setup done at $((SECONDS-START)) s"
mkdir -p $OUT/gc
timeout 470 python3 recipes/gpu_check.py --out $OUT/gc 2>&1 | tee $OUT/gpu_check.log
echo "gpu_check done at $((SECONDS-START)) s"
LEFT=$((${GOSSIP_UNTIL:-575} - (SECONDS-START)))
if [ $LEFT -gt 40 ]; then
  OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu timeout $LEFT python3 recipes/gossip_benchmark.py --world-sizes 2 4 \
    --repeats 5 --json $OUT/gc/gossip.json > $OUT/gossip.log 2>&1
  echo "gossip rc $? done at $((SECONDS-START)) s"; tail -30 $OUT/gossip.log
fi
cd $OUT && tar czf results.tgz gc pip.log 2>/dev/null && rm -rf gc pip.log
ls -la $OUT
