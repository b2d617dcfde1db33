cd /work/main
for i in 1 2; do
 for side in before after; do
  if [ $side = before ]; then root=/work/wt/trial; flag=""; else root=/work/main; flag="--no-compile"; fi
  (cd $root && PYTHONPATH=$root timeout 600 /work/main/.venv/bin/python -m benchmarks.overhead --threads 1 --sizes 32x128 --repeats 15 $flag --out /tmp/oh_${side}_$i > /tmp/oh_${side}_$i.log 2>&1)
  echo "$side $i $(date)"
 done
done
