#!/bin/bash
# The whole quality table, cheapest rows first, resumable (tools/eval/*.npz hold the progress).
# nohup bash tools/eval_all.sh > tools/.runs/eval.log 2>&1 &
# Cheap rows first so that whatever finishes in a session is a complete row.
cd "$(dirname "$0")/.."
for r in "student LCM 1" "student LCM 2" "student LCM 4" "teacher DDIM 1" "teacher DDIM 2" "teacher DDIM 4" "teacher DDIM 10" "teacher DDIM 20" "teacher DDIM 50"; do
  OMP_NUM_THREADS=1 EDGE_DIFFUSE_BIN=${EDGE_DIFFUSE_BIN:-target/release/edge-diffuse} python3 tools/eval_quality.py run --rows "$r" || exit 1
done
