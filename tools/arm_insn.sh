#!/usr/bin/env bash
# Instructions per model call of an aarch64 or armv7 build, counted under qemu-user with the qemu-insn
# plugin (../shared/tools/qemu-insn), and the functions they ran in. Deterministic, unlike any
# timing under emulation; turn counts into time only with a stated instructions-per-cycle and
# clock (docs/performance.md, "ARM").
#
#   tools/arm_insn.sh BINARY OUT [sample flags...]
#
# Runs `BINARY sample FLAGS --steps 1 --threads 1 --plan-cache off` with 1 and with 3 images;
# the difference, halved, is one model call without loading or start-up. Writes OUT.txt (the
# report) and prints its total. QEMU_CPU picks the core (default cortex-a76 for aarch64,
# cortex-a7 for armv7: qemu-arm has no Cortex-A53, and the counts depend only on the features);
# LIBINSN the built plugin (default /tmp/libinsn.so, built when missing).
set -euo pipefail
bin=$1 out=$2
shift 2
here="$(cd "$(dirname "$0")/.." && pwd)"
insn="${QEMU_INSN:-$here/../shared/tools/qemu-insn}"
lib="${LIBINSN:-/tmp/libinsn.so}"
[ -f "$lib" ] || gcc -O2 -shared -fPIC -fvisibility=hidden -o "$lib" "$insn/insn.c" -lpthread
# The ELF header's machine field: 0x28 is 32-bit ARM, 0xb7 aarch64.
if [ "$(od -An -tx1 -j18 -N1 "$bin" | tr -d ' ')" = 28 ]; then
  # A PIE executable runs at 0x40000000 under qemu-arm 7.2 (0x5500000000 under qemu-aarch64).
  qemu=(qemu-arm -L /usr/arm-linux-gnueabihf) nm=arm-linux-gnueabihf-nm base=0x40000000
  export QEMU_CPU="${QEMU_CPU:-cortex-a7}"
  # tract looks for NEON in /proc/cpuinfo, which under qemu-user is the host's: without this
  # its im2col path would run its generic kernels, not the NEON ones a board runs.
  export TRACT_CPU_ARM32_NEON="${TRACT_CPU_ARM32_NEON:-true}"
else
  qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu) nm=aarch64-linux-gnu-nm base=0x5500000000
  export QEMU_CPU="${QEMU_CPU:-cortex-a76}"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for n in 1 3; do
  "${qemu[@]}" -plugin "$lib,out=$tmp/insn$n.txt" "$bin" sample "$@" \
    --steps 1 --threads 1 --plan-cache off --num-images "$n" --quiet --out "$tmp/out$n.png"
done
python3 "$insn/insn_report.py" "$tmp/insn3.txt" "$bin" --minus "$tmp/insn1.txt" --per 2 --top 40 --nm "$nm" --base "$base" > "$out.txt"
head -1 "$out.txt"
