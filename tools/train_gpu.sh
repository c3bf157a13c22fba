#!/usr/bin/env bash
# One-shot training on a lent GPU machine (see README "Models"): teacher, classifier, student,
# then preview grids. Every phase is time-bounded; the results land in $OUT (weights only).
# Usage: FMNIST_DIR=.data OUT=/some/dir bash tools/train_gpu.sh TEACHER_S STUDENT_S
set -u
T=${1:-290}; S=${2:-200}
R=${OUT:?}/run
mkdir -p "$R"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  date
  python3 tools/train.py teacher --out "$R" --seconds "$T" --batch 512 --lr 4e-4 --checkpoint-every 60
  python3 tools/train.py classifier --out "$R" --seconds 25
  python3 tools/train.py student --out "$R" --seconds "$S" --batch 512 --lr 8e-5 --checkpoint-every 60
  python3 tools/preview.py "$R/teacher.pt" ddim 50 "$OUT/teacher-ddim50.png"
  python3 tools/preview.py "$R/teacher.pt" ddim 4 "$OUT/teacher-ddim4.png"
  python3 tools/preview.py "$R/student.pt" lcm 2 "$OUT/student-lcm2.png"
  date
} 2>&1 | tee "$OUT/train.log"
mv "$R"/teacher.pt "$R"/student.pt "$R"/classifier.pt "$OUT"/ 2>/dev/null
rm -rf "$R"
