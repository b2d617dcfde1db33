# This session's overhead before / after: baa26a1 (checked out in a second worktree, /work/wt/before)
# against this checkout, alternating runs of the same command, eager rows (--no-compile).
set -e
out=$(cd "$(dirname "$0")" && pwd)
after=$(cd "$out/../../.." && pwd)
before=${BEFORE:-/work/wt/before}
for i in 1 2; do
 for side in before after; do
  if [ $side = before ]; then root=$before; else root=$after; fi
  (cd $root && PYTHONPATH=$root timeout 900 "$after/.venv/bin/python" -m benchmarks.overhead --threads 1 \
     --sizes 32x128,256x512 --repeats 15 --no-compile --out "$out/${side}_$i" > "$out/${side}_$i.log" 2>&1)
  echo "$side $i $(date)"
 done
done
