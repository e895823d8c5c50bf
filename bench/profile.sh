#!/bin/sh
# Inside the lab: where does csi-vduse's server spend its CPU during one fio workload?
#   .venv/bin/python -m tests.lab.runner -- sh bench/profile.sh [fio rw] [bs] [iodepth]
# Prints perf's flat profile (cpu-clock sampling; the guest has no hardware counters).
set -eu
RW=${1:-read}; BS=${2:-1m}; DEPTH=${3:-8}
IMG=${LAB_SCRATCH:-/run/scratch}/profile.img
fio --name=fill --filename="$IMG" --rw=write --bs=1m --size=1G --ioengine=psync \
    --end_fsync=1 >/dev/null
python -m csi_vduse --log-level=warning export "$IMG" --name profile --queues 2 > /tmp/dev &
SERVER=$!
while [ ! -s /tmp/dev ]; do sleep 0.1; done
DEV=$(cat /tmp/dev)
fio --name=warm --filename="$DEV" --direct=1 --ioengine=libaio --rw="$RW" --bs="$BS" \
    --iodepth="$DEPTH" --size=1G --runtime=2 --time_based=1 >/dev/null
perf record -e cpu-clock -F 999 -g -p "$SERVER" -o /tmp/perf.data -- sleep 8 >/dev/null 2>&1 &
PERF=$!
fio --name=profile --filename="$DEV" --direct=1 --ioengine=libaio --rw="$RW" --bs="$BS" \
    --iodepth="$DEPTH" --size=1G --runtime=8 --time_based=1 | grep -E "IOPS|clat \(" || true
wait $PERF || true
perf report -i /tmp/perf.data --stdio --no-children --sort symbol --percent-limit 2 2>/dev/null \
    | grep -v "^$" | head -40
kill -TERM $SERVER; wait $SERVER
