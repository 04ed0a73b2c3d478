#!/usr/bin/env bash
# User-space instructions per 1-byte request/response exchange of one tunnel end, counted
# by callgrind: deterministic, unlike the clock on a shared machine (docs/BENCHMARKS.md,
# 2026-12-05 afternoon). Loopback only. Needs valgrind and python3; for `ssserver`, the
# shadowsocks-rust binaries (cargo install shadowsocks-rust --version 1.25.0 --bin sslocal
# --bin ssserver).
#
#   cargo build --release
#   scripts/callgrind-round-trip.sh server 5000     # the exit under callgrind
#   scripts/callgrind-round-trip.sh client 5000     # the client under callgrind
#   scripts/callgrind-round-trip.sh ssserver 5000   # shadowsocks-rust's server, same driver
#
# Prints "<end>: <instructions per exchange>" and leaves the profile in $OUT
# (callgrind_annotate $OUT shows where they go).
set -euo pipefail
cd "$(dirname "$0")/.."

end=${1:?usage: $0 server|client|ssserver [exchanges]}
count=${2:-5000}
bin=$PWD/target/release/halfpipe
work=$(mktemp -d)
OUT=${OUT:-$work/callgrind.out}
pids=()
grind_pid=
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# Starts "$@" in the background, under callgrind when $1 is "grind".
start() {
    if [ "$1" = grind ]; then
        shift
        valgrind --tool=callgrind --dump-instr=no --callgrind-out-file="$work/cg.%p" "$@" \
            >"$work/grind.log" 2>&1 &
        grind_pid=$! # valgrind runs the program in its own process
    else
        shift
        "$@" >"$work/$(basename "$1").log" 2>&1 &
    fi
    pids+=($!)
}

case $end in
server | client)
    "$bin" quickstart --dir "$work/qs" --check-only >/dev/null 2>&1
    socks=$(sed -n '/^\[socks5\]/,/^listen/s/^listen = "\(.*\)"/\1/p' "$work/qs/client.toml")
    if [ "$end" = server ]; then server=grind client=plain; else server=plain client=grind; fi
    start $server "$bin" server --config "$work/qs/server.toml"
    sleep 3
    start $client "$bin" client --config "$work/qs/client.toml"
    ;;
ssserver)
    key=$(head -c 32 /dev/urandom | base64)
    port=$((20000 + RANDOM % 20000))
    socks=127.0.0.1:$((port + 1))
    start grind ssserver -s "127.0.0.1:$port" -m 2022-blake3-aes-256-gcm -k "$key"
    sleep 3
    start plain sslocal -b "$socks" -s "127.0.0.1:$port" -m 2022-blake3-aes-256-gcm -k "$key"
    ;;
*)
    echo "unknown end '$end': server, client or ssserver" >&2
    exit 2
    ;;
esac
kill -0 "$grind_pid" 2>/dev/null || {
    echo "callgrind did not start (is valgrind installed?): $(cat "$work/grind.log")" >&2
    exit 1
}

# An echo server and a SOCKS5 client that takes turns with this script: after the warm-up
# it waits until the counters are zeroed, then times nothing and only exchanges.
python3 - "$socks" "$count" "$work/ready" <<'EOF' &
import os, socket, struct, sys, threading, time
socks, count, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
host, port = socks.rsplit(":", 1)
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
def echo():
    c, _ = ls.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (d := c.recv(65536)):
        c.sendall(d)
threading.Thread(target=echo, daemon=True).start()
deadline = time.time() + 120
while True:
    try:
        s = socket.create_connection((host, int(port)), timeout=10); break
    except OSError:
        if time.time() > deadline: sys.exit("the SOCKS5 port never opened")
        time.sleep(0.5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(b"\x05\x01\x00"); assert s.recv(2) == b"\x05\x00"
s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", ls.getsockname()[1]))
assert s.recv(10)[1] == 0, "the tunnel refused the connect"
for _ in range(300):
    s.sendall(b"x"); s.recv(1)
open(ready, "w").write("warm")
while open(ready).read() != "go":
    time.sleep(0.05)
for _ in range(count):
    s.sendall(b"x"); s.recv(1)
open(ready, "w").write("done")
EOF
driver=$!
pids+=($driver)
until [ -s "$work/ready" ]; do
    kill -0 "$driver" 2>/dev/null || { echo "the driver failed" >&2; exit 1; }
    sleep 0.5
done
callgrind_control -z "$grind_pid" >/dev/null 2>&1
printf go >"$work/ready"
until grep -q done "$work/ready"; do sleep 0.5; done
callgrind_control -d "$grind_pid" >/dev/null 2>&1
sleep 1
profile=$(ls "$work"/cg.*.1 | head -1)
cp "$profile" "$OUT"
total=$(callgrind_annotate "$OUT" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "$end: $((total / count)) instructions per exchange ($OUT)"
