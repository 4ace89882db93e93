#!/bin/bash
# 20 train.py steps of the demo recipe at another checkout (e.g. `git worktree add ../old cdbf918`,
# the commit before the split train step) and at this one, alternated A B A B on one machine.
#   bash benchmarks/train_ab.sh ../old [WORK_DIR]
set -e
OLD=$(cd "$1" && pwd)
NEW=$(cd "$(dirname "$0")/.." && pwd)
WORK=${2:-/tmp/train_ab}
mkdir -p $WORK
M=$NEW/bita_jax/demo/model
D=$WORK/distill.jsonl
if [ ! -s $D ]; then
  cd $NEW && python decode.py --model $M --mode ar --prompts $NEW/bita_jax/demo/prompts.jsonl \
    --max-new-tokens 128 --batch-size 8 --output $D
fi
run() { # $1 tree, $2 label
  rm -rf $WORK/run_$2
  cd $1 && PYTHONPATH=$1 python train.py --model $M --data $D --output $WORK/run_$2 --steps 20 --batch-size 8 \
    --set bita.num_prompt_tokens=16 --set bita.num_mask_tokens=3 --set seed=0 --set data.max_length=256 \
    --set "data.seq_buckets=[448]" --set optimizer.learning_rate=0.03 --set log_every=5 --set dtype=float32 2>/dev/null
  echo "$2: $(tail -3 $WORK/run_$2/metrics.jsonl | tr '\n' ' ')"
}
uptime
run $OLD before1; run $NEW after1; run $OLD before2; run $NEW after2
uptime
