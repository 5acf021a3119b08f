#!/usr/bin/env bash
# Sample RssAnon / RssFile (kB) of every `python -m polar_train train` process each 0.5 s, with its
# LOCAL_RANK, until none is left: what docs/benchmarks.md's ZeRO-3 per-rank memory table reads.
#   bash scripts/sample_rss.sh samples.txt &   # then start the torchrun job
set -euo pipefail
out=${1:?usage: sample_rss.sh OUTPUT_FILE}
: > "$out"
seen=0
while true; do
  pids=$(pgrep -f "python -m polar_train train" || true)
  if [ -z "$pids" ]; then
    [ "$seen" = 1 ] && break
    sleep 0.5
    continue
  fi
  seen=1
  for p in $pids; do
    rank=$(tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | sed -n 's/^LOCAL_RANK=//p' || true)
    [ -n "$rank" ] || continue  # the launcher's own bash / time wrappers
    anon=$(awk '/^RssAnon/{print $2}' "/proc/$p/status" 2>/dev/null || true)
    file=$(awk '/^RssFile/{print $2}' "/proc/$p/status" 2>/dev/null || true)
    echo "$(date +%H:%M:%S.%N | cut -c1-10) rank=$rank anon_kb=$anon file_kb=$file" >> "$out"
  done
  sleep 0.5
done
