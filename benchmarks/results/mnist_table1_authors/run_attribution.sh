#!/bin/bash
# The one-change-at-a-time attribution of the speed-up gap (torchdyn_deq.experiments.mnist.ATTRIBUTION):
# each run is --preset authors on the discrete rows without Jacobian regularization, one seed, EPOCHS
# epochs (shorter than the 3-seed table, labelled so), with one thing changed. From the repository root:
#   bash benchmarks/results/mnist_table1_authors/run_attribution.sh [NAME ...]     (default: all)
set -e
EPOCHS=${EPOCHS:-3}
OUT=benchmarks/results/mnist_table1_authors/attribution
BASE="--variants vanilla,skip,skip_reg --jacobian no --forms discrete --seeds 6171 --no-baseline --threads 1 --no-progress"
declare -A CHANGE=(
  [authors]="--forms discrete,continuous"
  [stop_per_sample]="--termination per_sample"
  [skip_loss_paper]="--aux-loss paper"
  [skip_weight_paper]="--skip-weight 1.28"
  [solver_anderson]="--discrete-solver anderson"
  [solver_tsit5]="--forms continuous"  # also the continuous rows of the authors run
  [optimizer_adam]="--optimizer adam"
  [arch_paper]="--arch paper"
  [preset_paper]="--preset paper --forms continuous"
)
NAMES=${@:-authors stop_per_sample skip_loss_paper skip_weight_paper solver_anderson optimizer_adam arch_paper preset_paper}
for name in $NAMES; do
  echo "$(date -u +%H:%M:%S) start $name load $(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT.log
  python -m torchdyn_deq.experiments.mnist --preset authors $BASE --epochs $EPOCHS ${CHANGE[$name]} \
    --out-dir $OUT/$name > $OUT/$name.out 2>&1
  echo "$(date -u +%H:%M:%S) done $name" >> $OUT.log
done
# every run's comparison.md by the current writers, the main run's with the attribution in it
python -c "from pathlib import Path; from torchdyn_deq.experiments import mnist
out, paper = Path('benchmarks/results/mnist_table1_authors'), Path('benchmarks/results/mnist_table1_paper')
for d in [*sorted((out / 'attribution').glob('*/')), out]:
    if (d / 'results.json').exists():
        mnist.rewrite_comparison(d, paper)"
