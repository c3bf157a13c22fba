#!/usr/bin/env bash
# Runs a command under a memory-cgroup limit, without swap, and says whether the kernel killed it.
# As root. cgroup v2 (memory.max, memory.swap.max) or v1 (memory.limit_in_bytes,
# memory.memsw.limit_in_bytes where the kernel accounts swap).
#
#   sudo tools/run_in_cgroup.sh 68 -- target/release/edge-diffuse bench --model DIR --threads 1 --json
#   COLD=1 sudo tools/run_in_cgroup.sh 68 -- ...   # drop the page cache first (a cold start)
#
# Prints the command's output, then one line: the limit, the exit status, and the OOM kills.
set -euo pipefail
if [[ $# -lt 3 || "$2" != "--" ]]; then
    echo "usage: $0 LIMIT_MIB -- COMMAND..." >&2
    exit 2
fi
limit_mib=$1
shift 2
bytes=$((limit_mib * 1024 * 1024))
name="edge-diffuse-$$"
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    dir=/sys/fs/cgroup/$name
    mkdir "$dir"
    echo "$bytes" > "$dir/memory.max"
    [[ -f "$dir/memory.swap.max" ]] && echo 0 > "$dir/memory.swap.max"
    oom() { awk '/^oom_kill /{print $2}' "$dir/memory.events"; }
elif [[ -d /sys/fs/cgroup/memory ]]; then
    dir=/sys/fs/cgroup/memory/$name
    mkdir "$dir"
    echo "$bytes" > "$dir/memory.limit_in_bytes"
    [[ -f "$dir/memory.memsw.limit_in_bytes" ]] && echo "$bytes" > "$dir/memory.memsw.limit_in_bytes"
    oom() { awk '/^oom_kill /{print $2}' "$dir/memory.oom_control" 2>/dev/null || cat "$dir/memory.failcnt"; }
else
    echo "no memory cgroup controller under /sys/fs/cgroup" >&2
    exit 2
fi
cleanup() { rmdir "$dir" 2>/dev/null || true; }
trap cleanup EXIT
if [[ "${COLD:-0}" == 1 ]]; then
    sync
    echo 3 > /proc/sys/vm/drop_caches || echo "note: could not drop the page cache" >&2
fi
status=0
bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' cgroup "$dir" "$@" || status=$?
echo "cgroup: limit ${limit_mib} MiB, exit status ${status}, oom kills $(oom)" >&2
exit "$status"
