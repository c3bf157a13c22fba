#!/usr/bin/env bash
# Instructions per model call of an aarch64 build, counted under qemu-user with the qemu-insn
# plugin (../shared/tools/qemu-insn), and the functions they ran in. Deterministic, unlike any
# timing under emulation; turn counts into time only with a stated instructions-per-cycle and
# clock (docs/performance.md, "ARM").
#
#   tools/arm_insn.sh BINARY OUT [sample flags...]
#
# Runs `BINARY sample FLAGS --steps 1 --threads 1 --plan-cache off` with 1 and with 3 images;
# the difference, halved, is one model call without loading or start-up. Writes OUT.txt (the
# report) and prints its total. QEMU_CPU picks the core (default cortex-a76); LIBINSN the built
# plugin (default /tmp/libinsn.so, built when missing).
set -euo pipefail
bin=$1 out=$2
shift 2
here="$(cd "$(dirname "$0")/.." && pwd)"
insn="${QEMU_INSN:-$here/../shared/tools/qemu-insn}"
lib="${LIBINSN:-/tmp/libinsn.so}"
[ -f "$lib" ] || gcc -O2 -shared -fPIC -fvisibility=hidden -o "$lib" "$insn/insn.c" -lpthread
export QEMU_CPU="${QEMU_CPU:-cortex-a76}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for n in 1 3; do
  qemu-aarch64 -L /usr/aarch64-linux-gnu -plugin "$lib,out=$tmp/insn$n.txt" "$bin" sample "$@" \
    --steps 1 --threads 1 --plan-cache off --num-images "$n" --quiet --out "$tmp/out$n.png"
done
python3 "$insn/insn_report.py" "$tmp/insn3.txt" "$bin" --minus "$tmp/insn1.txt" --per 2 --top 40 > "$out.txt"
head -1 "$out.txt"
