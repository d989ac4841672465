#!/bin/sh
# Run a command under a hard memory cap (cgroup v1 memory controller; needs root):
#   benchmarks/capped.sh 4G python benchmarks/bench_streaming.py run ...
# The cap covers resident memory and page cache together (memory.limit_in_bytes = memory.memsw.limit_in_bytes);
# going over it gets the process killed by the kernel's OOM killer (exit 137), which the summary line reports.
set -e
cap=$1; shift
cg=/sys/fs/cgroup/memory/llmquant-cap-$$
mkdir -p "$cg"
echo "$cap" > "$cg/memory.limit_in_bytes"
echo "$cap" > "$cg/memory.memsw.limit_in_bytes" 2>/dev/null || true
rc=0
sh -c "echo \$\$ > $cg/cgroup.procs && exec /usr/bin/time -v \"\$@\"" sh "$@" || rc=$?
echo "capped.sh: cap $cap, max usage (resident + page cache) $(cat $cg/memory.max_usage_in_bytes) bytes, times at the cap $(cat $cg/memory.failcnt), $(grep oom_kill $cg/memory.oom_control | tr '\n' ' '), exit $rc" >&2
rmdir "$cg" 2>/dev/null || true
exit $rc
