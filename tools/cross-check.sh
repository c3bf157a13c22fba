#!/usr/bin/env bash
# Cross-builds edge-diffuse for the ARM boards without a container engine (rustup targets +
# Debian's cross gcc, configured in .cargo/config.toml) and runs it under qemu-user.
#
#   tools/cross-check.sh [--install] [STEP ...]      default steps: test release f16 boards
#
#   test     cargo test --target aarch64-unknown-linux-gnu (dev profile), whole suite under qemu
#   test-armv7   the same for armv7-unknown-linux-gnueabihf
#   release  release builds of aarch64-gnu, aarch64-musl (static) and armv7-gnueabihf (or the
#            triples in $RELEASE_TARGETS); stripped
#            size; `sample` of both shipped models under qemu compared with the x86 references
#   f16      `sample`/`bench --precision f16` under qemu with fp16 arithmetic, error against f32
#   boards   one build per board (-C target-cpu=...), stripped size, `sample` under
#            `qemu -cpu <that core>`; plus a trimmed build (--no-default-features) for Pi 4;
#            $BOARDS picks some (pi4 pi5 orin pi3-armv7 pi4-trimmed)
#
# Results go to target/cross-check/summary.txt (appended, one line each) and stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

GNU=aarch64-unknown-linux-gnu
MUSL=aarch64-unknown-linux-musl
ARMV7=armv7-unknown-linux-gnueabihf
TARGET=${CARGO_TARGET_DIR:-target}
OUT=target/cross-check
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
JOBS=${JOBS:-2}

note() { echo "$*" | tee -a "$SUMMARY"; }

runner_for() {
  case $1 in
    $GNU) echo "qemu-aarch64 -L /usr/aarch64-linux-gnu" ;;
    $MUSL) echo "qemu-aarch64" ;;
    $ARMV7) echo "qemu-arm -L /usr/arm-linux-gnueabihf" ;;
  esac
}
strip_for() {
  case $1 in
    $ARMV7) echo arm-linux-gnueabihf-strip ;;
    *) echo aarch64-linux-gnu-strip ;;
  esac
}

install() {
  if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v arm-linux-gnueabihf-gcc >/dev/null \
    || ! command -v qemu-aarch64 >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf \
      libc6-dev-armhf-cross qemu-user >/dev/null
  fi
  rustup target add $GNU $MUSL $ARMV7
}

timed() { # label, command...
  local label=$1 start=$SECONDS
  shift
  "$@"
  note "$label: $((SECONDS - start)) s"
}

run_tests() { # target
  local t=$1
  timed "$t cargo test --no-run (dev profile)" cargo test -j "$JOBS" --target "$t" --no-run
  # The CLI tests start the binary themselves: give them the runner too.
  # aarch64 as a Cortex-A76: the f16 test then runs tract's NEON fp16 kernels (see f16 below).
  (export EDGE_DIFFUSE_TEST_RUNNER="$(runner_for "$t")"
    [ "$t" != $GNU ] || export QEMU_CPU=cortex-a76 TRACT_CPU_AARCH64_KIND=a75
    timed "$t cargo test under qemu" cargo test -j "$JOBS" --target "$t" --no-fail-fast) 2>&1 | tee "$OUT/test-$t.log"
  grep -h "cross-arch\|^f16" "$OUT/test-$t.log" | sed "s/^/$t test: /" | tee -a "$SUMMARY" || true
}

# sample: runner, binary, tag; draws the cross-arch reference requests and compares.
sample_refs() {
  local runner=$1 bin=$2 tag=$3
  local dir=$OUT/$tag
  mkdir -p "$dir"
  $runner "$bin" sample --model models/fmnist-student --seed 7 --num-images 2 --class 3,7 --threads 1 \
    --quiet --save-tensor "$dir/student-lcm2.npy" --out "$dir/student-lcm2.png" "${@:4}"
  $runner "$bin" sample --model models/fmnist-teacher --sampler ddim --steps 4 --guidance 2 --seed 7 \
    --num-images 2 --class 1,8 --threads 1 --quiet \
    --save-tensor "$dir/teacher-ddim4-g2.npy" --out "$dir/teacher-ddim4-g2.png" "${@:4}"
  for name in student-lcm2 teacher-ddim4-g2; do
    note "$tag $name: $(compare "$dir/$name.npy" "tests/fixtures/cross_arch/$name.npy"), PNG bytes $(
      cmp -s "$dir/$name.png" "tests/fixtures/cross_arch/$name.png" && echo identical || echo differ) vs x86"
  done
}

compare() { # a.npy b.npy: max abs difference (numpy)
  python3 -c "import numpy as np, sys; a, b = (np.load(p) for p in sys.argv[1:]); \
print(f'max abs diff {float(np.abs(a.astype(np.float64) - b).max()):.2e}')" "$1" "$2" 2>/dev/null \
    || echo "(numpy missing: compare $1 and $2)"
}

size_of() { # target, binary -> stripped size
  local stripped=$2.stripped
  "$(strip_for "$1")" -o "$stripped" "$2"
  stat -c %s "$stripped"
}

release() {
  for t in ${RELEASE_TARGETS:-$GNU $MUSL $ARMV7}; do
    timed "$t cargo build --release" cargo build -j "$JOBS" --release --target "$t"
    local bin=$TARGET/$t/release/edge-diffuse
    note "$t release: $(stat -c %s "$bin") bytes, stripped $(size_of "$t" "$bin") bytes ($(file -b "$bin" | cut -d, -f1-2))"
    local start=$SECONDS
    sample_refs "$(runner_for "$t")" "$bin" "$t"
    note "$t sample of both references under qemu: $((SECONDS - start)) s"
  done
}

f16() {
  local bin=$TARGET/$GNU/release/edge-diffuse
  [ -x "$bin" ] || cargo build -j "$JOBS" --release --target $GNU
  # qemu-user shows the host's /proc/cpuinfo, so tract cannot see the emulated fp16 support:
  # name the core kind (see ../shared/notes and tract-linalg's TRACT_CPU_AARCH64_KIND).
  local -a modes=("cortex-a76:TRACT_CPU_AARCH64_KIND=a75" "max:TRACT_SVE_DISABLE=1")
  for mode in "${modes[@]}"; do
    local cpu=${mode%%:*} env=${mode#*:} tag=f16-${mode%%:*}
    local start=$SECONDS
    (export QEMU_CPU="$cpu" "${env?}"; sample_refs "$(runner_for $GNU)" "$bin" "$tag" --precision f16)
    note "$tag sample under qemu: $((SECONDS - start)) s (lines above: f16 against the x86 f32 reference)"
    for p in f32 f16; do
      local json
      json=$(export QEMU_CPU="$cpu" "${env?}"; qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin" bench --runs 3 --threads 1 \
        --json --precision $p)
      note "bench qemu -cpu $cpu ($env) --precision $p: $json"
    done
  done
}

boards() {
  # board:target:target-cpu:qemu cpu
  local -a list=(
    "pi4:$GNU:cortex-a72:cortex-a72"
    "pi5:$GNU:cortex-a76:cortex-a76"
    "orin:$GNU:cortex-a78ae:max"
    "pi3-armv7:$ARMV7:cortex-a53:max"
  )
  for entry in "${list[@]}"; do
    IFS=: read -r board t cpu qcpu <<<"$entry"
    [[ " ${BOARDS:-pi4 pi5 orin pi3-armv7 pi4-trimmed} " == *" $board "* ]] || continue
    local dir=target/boards/$board
    RUSTFLAGS="-C target-cpu=$cpu" CARGO_TARGET_DIR=$dir \
      timed "board $board ($t, target-cpu=$cpu) cargo build --release" cargo build -j "$JOBS" --release --target "$t"
    local bin=$dir/$t/release/edge-diffuse
    note "board $board: stripped $(size_of "$t" "$bin") bytes"
    (export QEMU_CPU=$qcpu; sample_refs "$(runner_for "$t")" "$bin" "board-$board")
  done
  # Trimmed: no rayon executor, no transformer operators (enough for the shipped UNets).
  [[ " ${BOARDS:-pi4-trimmed} " == *" pi4-trimmed "* ]] || return 0
  local dir=target/boards/pi4-trimmed
  RUSTFLAGS="-C target-cpu=cortex-a72" CARGO_TARGET_DIR=$dir \
    timed "board pi4-trimmed (--no-default-features) cargo build --release" \
    cargo build -j "$JOBS" --release --target $GNU --no-default-features
  note "board pi4-trimmed: stripped $(size_of $GNU "$dir/$GNU/release/edge-diffuse") bytes"
  (export QEMU_CPU=cortex-a72; sample_refs "$(runner_for $GNU)" "$dir/$GNU/release/edge-diffuse" board-pi4-trimmed)
}

steps=()
for arg in "$@"; do
  case $arg in
    --install) install ;;
    test | test-armv7 | release | f16 | boards) steps+=("$arg") ;;
    *) echo "unknown step $arg (test, test-armv7, release, f16, boards, --install)" >&2; exit 2 ;;
  esac
done
[ ${#steps[@]} -gt 0 ] || steps=(test release f16 boards)
note "== $(date -u +%FT%TZ) cross-check: ${steps[*]}"
for s in "${steps[@]}"; do
  case $s in
    test) run_tests $GNU ;;
    test-armv7) run_tests $ARMV7 ;;
    release) release ;;
    f16) f16 ;;
    boards) boards ;;
  esac
done
