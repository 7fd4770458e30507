#!/usr/bin/env bash
# Whole-proxy benchmark: kcp-server and nginx in front of the same mock upstream, side by side
# with direct calls to that mock, in one run: requests per second, latency, the CPU time each
# proxy spends per request, peak memory and start-up time. Method and figures:
# docs/benchmarks.md.
#
#   benches/proxy_compare.sh            # needs wrk, nginx, curl; run from anywhere in the repo
#
# Tunables (environment): DURATION (default 10s) for the throughput runs, ROUNDS (2),
# CONNS (64), THREADS (2); LAT_DURATION (5s) for the -c1 latency runs; STREAM_DURATION (5s),
# STREAM_CONNS (16), STREAM_CHUNKS (16) for the SSE run (STREAM_DURATION=0 skips it);
# EXTRA_DURATION (5s) for the extra rows (MANY_CONNS=1000 connections, request bodies of
# BODY_SIZES="1024 65536" bytes; EXTRA_DURATION=0 skips them); READY_RUNS (5) starts of kcp
# timed until /ready answers 200; NGINX_WORKERS (auto); SKIP_BUILD=1 runs the binaries
# already built (e.g. while the tree does not compile); KCP_BIN runs another kcp-server
# binary (say, a copy of the one before a change). Everything listens on 127.0.0.1 only
# and every process started here is killed on exit. Total time with the defaults: about
# 3 minutes after the build.
set -euo pipefail

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-2}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
LAT_DURATION=${LAT_DURATION:-5s}
STREAM_DURATION=${STREAM_DURATION:-5s}
STREAM_CONNS=${STREAM_CONNS:-16}
STREAM_CHUNKS=${STREAM_CHUNKS:-16}
EXTRA_DURATION=${EXTRA_DURATION:-5s}
MANY_CONNS=${MANY_CONNS:-1000}
BODY_SIZES=${BODY_SIZES:-1024 65536}
READY_RUNS=${READY_RUNS:-5}
NGINX_WORKERS=${NGINX_WORKERS:-auto}
WARMUP=${WARMUP:-2s}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

for tool in wrk nginx curl; do
    command -v "$tool" >/dev/null || { echo "missing tool: $tool (apt-get install wrk nginx-light curl)" >&2; exit 1; }
done

TMP=$(mktemp -d -t kcp-bench.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '==> %s\n' "$*" >&2; }

# ---- build ---------------------------------------------------------------------------------
# The mock is an example of the root package (its hyper/tokio are root dev-dependencies), so it
# is built with -p key-cycle-proxy; the binary with -p kcp-server.
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    log "SKIP_BUILD=1: using the binaries already in the target dir"
else
    log "building (release)"
    cargo build --release --quiet -p kcp-server
    cargo build --release --quiet -p key-cycle-proxy --example mock_openai
fi
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
KCP_BIN=${KCP_BIN:-$TARGET_DIR/release/kcp-server}
MOCK_BIN=$TARGET_DIR/release/examples/mock_openai
for bin in "$KCP_BIN" "$MOCK_BIN"; do
    [ -x "$bin" ] || { echo "not built: $bin" >&2; exit 1; }
done

# ---- helpers -------------------------------------------------------------------------------
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768 and up here), where
# the load's own client sockets would make a port that does not answer still unbindable.
free_port() {
    local port i
    for i in $(seq 1 200); do
        port=$((12000 + RANDOM % 20000))
        if ! port_open "$port"; then
            echo "$port"
            return 0
        fi
    done
    echo "no free port found" >&2
    return 1
}

wait_port() { # port name
    local i
    for i in $(seq 1 100); do
        port_open "$1" && return 0
        sleep 0.1
    done
    echo "$2 did not open port $1 within 10s" >&2
    return 1
}

# ---- mock upstream -------------------------------------------------------------------------
"$MOCK_BIN" 0 "$STREAM_CHUNKS" >"$TMP/mock.out" 2>"$TMP/mock.err" &
PIDS+=($!)
for _ in $(seq 1 100); do
    grep -q 'listening on' "$TMP/mock.out" 2>/dev/null && break
    sleep 0.1
done
MOCK_ADDR=$(sed -n 's/^listening on //p' "$TMP/mock.out")
[ -n "$MOCK_ADDR" ] || { echo "mock did not start" >&2; cat "$TMP/mock.err" >&2; exit 1; }
MOCK_PORT=${MOCK_ADDR##*:}
log "mock upstream on $MOCK_ADDR"

# ---- kcp-server ----------------------------------------------------------------------------
KCP_PORT=$(free_port)
METRICS_PORT=$(free_port)
while [ "$METRICS_PORT" = "$KCP_PORT" ]; do METRICS_PORT=$(free_port); done
# Only these variables: no inherited KCP_*, RUST_LOG (which would override the log level) or
# config.toml / config.json from the working directory (kcp runs in the temp dir).
kcp_env=(
    env -i PATH="$PATH" HOME="$TMP"
    OPENAI_KEYS=sk-bench-1,sk-bench-2,sk-bench-3,sk-bench-4
    KCP_UPSTREAM__BASE_URL="http://127.0.0.1:$MOCK_PORT/v1"
    KCP_SERVER__BIND_ADDR="127.0.0.1:$KCP_PORT"
    KCP_OBSERVABILITY__METRICS_BIND="127.0.0.1:$METRICS_PORT"
    KCP_OBSERVABILITY__TRACING_LEVEL=warn
)
(cd "$TMP" && "${kcp_env[@]}" "$KCP_BIN" --check-config >"$TMP/kcp-check.out" 2>&1) || {
    echo "kcp-server --check-config failed:" >&2
    cat "$TMP/kcp-check.out" >&2
    exit 1
}
(cd "$TMP" && exec "${kcp_env[@]}" "$KCP_BIN" >"$TMP/kcp.out" 2>"$TMP/kcp.err") &
KCP_PID=$!
PIDS+=("$KCP_PID")
wait_port "$KCP_PORT" kcp-server
log "kcp-server on 127.0.0.1:$KCP_PORT (metrics 127.0.0.1:$METRICS_PORT)"

# ---- nginx ---------------------------------------------------------------------------------
NGINX_PORT=$(free_port)
while [ "$NGINX_PORT" = "$KCP_PORT" ] || [ "$NGINX_PORT" = "$METRICS_PORT" ]; do NGINX_PORT=$(free_port); done
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes $NGINX_WORKERS;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    # Request bodies stay in memory up to 128 KiB (kcp buffers them in memory too) rather
    # than going to a temp file past the default 16 KiB.
    client_body_buffer_size 128k;
    client_body_temp_path $TMP/nginx/client_body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    keepalive_requests 1000000;
    upstream mock {
        server 127.0.0.1:$MOCK_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" -g 'daemon off;' \
    >"$TMP/nginx/stdout" 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_port "$NGINX_PORT" nginx
log "nginx ($NGINX_WORKERS workers) on 127.0.0.1:$NGINX_PORT"

declare -A URL=(
    [direct]="http://127.0.0.1:$MOCK_PORT"
    [kcp]="http://127.0.0.1:$KCP_PORT"
    [nginx]="http://127.0.0.1:$NGINX_PORT"
)
TARGETS=(direct kcp nginx)

# ---- sanity: every target answers 200 with the mock's body ---------------------------------
BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
for t in "${TARGETS[@]}"; do
    code=$(curl -s -o "$TMP/sanity-$t.json" -w '%{http_code}' -X POST \
        -H 'content-type: application/json' --data "$BODY" "${URL[$t]}/v1/chat/completions")
    if [ "$code" != 200 ] || ! grep -q chatcmpl-bench "$TMP/sanity-$t.json"; then
        echo "sanity check failed for $t: HTTP $code" >&2
        cat "$TMP/sanity-$t.json" >&2
        exit 1
    fi
done
log "sanity: all three targets answer 200"

# ---- load ----------------------------------------------------------------------------------
cat >"$TMP/chat.lua" <<EOF
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$BODY'
EOF
STREAM_BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16,"stream":true}'
cat >"$TMP/stream.lua" <<EOF
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$STREAM_BODY'
EOF
# A chat request of exactly N bytes: the user message is padded with 'a's.
for size in $BODY_SIZES; do
    pad=$((size - ${#BODY}))
    [ "$pad" -ge 0 ] || { echo "BODY_SIZES: $size is smaller than the base body" >&2; exit 1; }
    cat >"$TMP/body-$size.lua" <<EOF
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello.' .. string.rep("a", $pad) .. '"}],"max_tokens":16}'
EOF
done

# wrk's latency to milliseconds: "812.00us", "1.23ms", "1.02s", "2.00m".
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n = n / 1000
        else if (v ~ /ms$/) n = n
        else if (v ~ /m$/) n = n * 60000
        else if (v ~ /s$/) n = n * 1000
        printf "%.3f", n
    }'
}

# CPU time (user and system, clock ticks) used so far by the processes serving TARGET: kcp, or
# nginx's master and workers; 0 0 for direct (the mock is shared by every target).
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # target
    local pids pid user=0 sys=0
    case $1 in
        kcp) pids=$KCP_PID ;;
        nginx) pids="$NGINX_PID $(pgrep -P "$NGINX_PID" || true)" ;;
        *) pids= ;;
    esac
    for pid in $pids; do
        # Fields 14 and 15 of /proc/PID/stat (utime, stime), counted after the ")" that ends
        # the command name.
        read -r u s < <(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12, $13}') || continue
        user=$((user + u))
        sys=$((sys + s))
    done
    echo "$user $sys"
}

# run NAME TARGET SCRIPT THREADS CONNS DURATION: appends "name target rps p50 p99 non2xx errors
# cpu_user_us_per_request cpu_sys_us_per_request".
RESULTS=$TMP/results.txt
: >"$RESULTS"
run() {
    local name=$1 target=$2 script=$3 threads=$4 conns=$5 duration=$6 out
    out=$TMP/wrk-$name-$target-$(date +%s%N).txt
    local before after
    before=$(cpu_ticks "$target")
    wrk -t"$threads" -c"$conns" -d"$duration" --latency -s "$script" "${URL[$target]}" >"$out" 2>&1
    after=$(cpu_ticks "$target")
    local requests cpu_user cpu_sys
    requests=$(awk '/ requests in / {print $1}' "$out")
    read -r cpu_user cpu_sys < <(awk -v b="$before" -v a="$after" -v n="${requests:-0}" -v hz="$CLK_TCK" 'BEGIN {
        split(b, x, " "); split(a, y, " ")
        if (n > 0) printf "%.1f %.1f\n", (y[1] - x[1]) * 1e6 / hz / n, (y[2] - x[2]) * 1e6 / hz / n
        else print "0 0" }')
    local rps p50 p99 non2xx errors
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
    errors=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$out")
    printf '%s %s %s %s %s %s %s %s %s\n' "$name" "$target" "${rps:-0}" "$p50" "$p99" \
        "${non2xx:-0}" "${errors:-0}" "$cpu_user" "$cpu_sys" >>"$RESULTS"
    printf '    %-7s %-6s %10s req/s  p50 %8s ms  p99 %8s ms  non-2xx %s  socket errors %s\n' \
        "$name" "$target" "${rps:-0}" "$p50" "$p99" "${non2xx:-0}" "${errors:-0}" >&2
}

log "warm-up: $WARMUP per target"
for t in "${TARGETS[@]}"; do
    wrk -t"$THREADS" -c"$CONNS" -d"$WARMUP" -s "$TMP/chat.lua" "${URL[$t]}" >/dev/null 2>&1
done

log "throughput: -t$THREADS -c$CONNS -d$DURATION, $ROUNDS rounds, targets interleaved"
for _ in $(seq 1 "$ROUNDS"); do
    for t in "${TARGETS[@]}"; do
        run load "$t" "$TMP/chat.lua" "$THREADS" "$CONNS" "$DURATION"
    done
done

log "latency: -t1 -c1 -d$LAT_DURATION, $ROUNDS rounds, targets interleaved"
for _ in $(seq 1 "$ROUNDS"); do
    for t in "${TARGETS[@]}"; do
        run c1 "$t" "$TMP/chat.lua" 1 1 "$LAT_DURATION"
    done
done

if [ "$STREAM_DURATION" != 0 ]; then
    log "streaming ($STREAM_CHUNKS SSE chunks per response): -t$THREADS -c$STREAM_CONNS -d$STREAM_DURATION, 1 round"
    for t in "${TARGETS[@]}"; do
        run sse "$t" "$TMP/stream.lua" "$THREADS" "$STREAM_CONNS" "$STREAM_DURATION"
    done
fi

# Peak resident memory (VmHWM) so far: after the JSON, -c1 and SSE runs, and again at the end.
vm_hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
nginx_hwm_kb() {
    local pid total=0
    for pid in $NGINX_PID $(pgrep -P "$NGINX_PID" || true); do
        total=$((total + $(vm_hwm_kb "$pid")))
    done
    echo "$total"
}
KCP_HWM_MAIN=$(vm_hwm_kb "$KCP_PID")
NGINX_HWM_MAIN=$(nginx_hwm_kb)

if [ "$EXTRA_DURATION" != 0 ]; then
    log "many connections: -t$THREADS -c$MANY_CONNS -d$EXTRA_DURATION, 1 round"
    for t in "${TARGETS[@]}"; do
        run many "$t" "$TMP/chat.lua" "$THREADS" "$MANY_CONNS" "$EXTRA_DURATION"
    done
    for size in $BODY_SIZES; do
        log "request body of $size bytes: -t$THREADS -c$CONNS -d$EXTRA_DURATION, 1 round"
        for t in "${TARGETS[@]}"; do
            run "body$size" "$t" "$TMP/body-$size.lua" "$THREADS" "$CONNS" "$EXTRA_DURATION"
        done
    done
fi

KCP_HWM=$(vm_hwm_kb "$KCP_PID")
NGINX_HWM=$(nginx_hwm_kb)

# Start to ready: a fresh kcp on its own ports, timed from the launch until GET /ready answers
# 200 (polled over bash's /dev/tcp with no pause between tries, bounded at 10 s).
ready_ok() { # port
    local status
    { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
    printf 'GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3
    read -r -t 1 _ status _ <&3 || status=
    exec 3<&-
    [ "$status" = 200 ]
}
READY_MS=()
for _ in $(seq 1 "$READY_RUNS"); do
    rport=$(free_port)
    rmetrics=$(free_port)
    while [ "$rmetrics" = "$rport" ]; do rmetrics=$(free_port); done
    started=$(date +%s%N)
    (cd "$TMP" && exec env -i PATH="$PATH" HOME="$TMP" OPENAI_KEYS=sk-bench-1,sk-bench-2 \
        KCP_UPSTREAM__BASE_URL="http://127.0.0.1:$MOCK_PORT/v1" \
        KCP_SERVER__BIND_ADDR="127.0.0.1:$rport" \
        KCP_OBSERVABILITY__METRICS_BIND="127.0.0.1:$rmetrics" \
        KCP_OBSERVABILITY__TRACING_LEVEL=warn "$KCP_BIN" >"$TMP/ready.out" 2>&1) &
    rpid=$!
    ready=0
    while [ $(($(date +%s%N) - started)) -lt 10000000000 ]; do
        if ready_ok "$rport"; then
            ready=1
            break
        fi
    done
    ended=$(date +%s%N)
    kill "$rpid" 2>/dev/null || true
    wait "$rpid" 2>/dev/null || true
    [ "$ready" = 1 ] || { echo "kcp did not become ready within 10 s:" >&2; cat "$TMP/ready.out" >&2; exit 1; }
    READY_MS+=("$(awk -v d=$((ended - started)) 'BEGIN { printf "%.1f", d / 1e6 }')")
done

# ---- report --------------------------------------------------------------------------------
# Per scenario and target: the means of req/s, p50 and p99 over the rounds, then ratios against
# direct and of kcp against nginx.
echo
echo "## Results ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p' | head -1))"
echo
awk -v conns="$CONNS" -v threads="$THREADS" -v sconns="$STREAM_CONNS" -v chunks="$STREAM_CHUNKS" -v many="$MANY_CONNS" '
    {
        k = $1 SUBSEP $2
        n[k]++; rps[k] += $3; p50[k] += $4; p99[k] += $5; bad[k] += $6; err[k] += $7
        cu[k] += $8; cs[k] += $9
        if (!($1 in seen)) { seen[$1] = 1; order[++m] = $1 }
    }
    function r(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "-" }
    END {
        label["load"] = sprintf("throughput (-t%s -c%s)", threads, conns)
        label["c1"] = "latency (-t1 -c1)"
        label["sse"] = sprintf("SSE %s chunks (-t%s -c%s)", chunks, threads, sconns)
        label["many"] = sprintf("many connections (-t%s -c%s)", threads, many)
        printf "| scenario | target | req/s | p50 ms | p99 ms | non-2xx | socket errors |\n"
        printf "|---|---|---:|---:|---:|---:|---:|\n"
        for (i = 1; i <= m; i++) {
            s = order[i]
            if (!(s in label)) label[s] = sprintf("body %s B (-t%s -c%s)", substr(s, 5), threads, conns)
            split("direct kcp nginx", ts, " ")
            for (j = 1; j <= 3; j++) {
                k = s SUBSEP ts[j]
                if (!(k in n)) continue
                R[s, ts[j]] = rps[k] / n[k]; P50[s, ts[j]] = p50[k] / n[k]; P99[s, ts[j]] = p99[k] / n[k]
                printf "| %s | %s | %.0f | %.3f | %.3f | %d | %d |\n", label[s], ts[j], R[s, ts[j]], P50[s, ts[j]], P99[s, ts[j]], bad[k], err[k]
            }
        }
        printf "\n| scenario | ratio | req/s | p50 | p99 |\n|---|---|---:|---:|---:|\n"
        for (i = 1; i <= m; i++) {
            s = order[i]
            printf "| %s | kcp/direct | %s | %s | %s |\n", label[s], r(R[s,"kcp"], R[s,"direct"]), r(P50[s,"kcp"], P50[s,"direct"]), r(P99[s,"kcp"], P99[s,"direct"])
            printf "| %s | nginx/direct | %s | %s | %s |\n", label[s], r(R[s,"nginx"], R[s,"direct"]), r(P50[s,"nginx"], P50[s,"direct"]), r(P99[s,"nginx"], P99[s,"direct"])
            printf "| %s | kcp/nginx | %s | %s | %s |\n", label[s], r(R[s,"kcp"], R[s,"nginx"]), r(P50[s,"kcp"], P50[s,"nginx"]), r(P99[s,"kcp"], P99[s,"nginx"])
        }
        printf "\nCPU time per request of the proxy process(es) (user + system, microseconds; the mock and wrk excluded):\n\n"
        printf "| scenario | kcp | nginx | kcp/nginx |\n|---|---:|---:|---:|\n"
        for (i = 1; i <= m; i++) {
            s = order[i]
            kk = s SUBSEP "kcp"; nk = s SUBSEP "nginx"
            if (!(kk in n) || !(nk in n)) continue
            K = (cu[kk] + cs[kk]) / n[kk]; N = (cu[nk] + cs[nk]) / n[nk]
            printf "| %s | %.1f (%.1f + %.1f) | %.1f (%.1f + %.1f) | %s |\n", label[s], K, cu[kk] / n[kk], cs[kk] / n[kk], N, cu[nk] / n[nk], cs[nk] / n[nk], r(K, N)
        }
        if (("c1", "kcp") in R) {
            printf "\nAdded latency per request at -c1, vs direct: p50 kcp %+.0f us, nginx %+.0f us; mean (1/req/s) kcp %+.0f us, nginx %+.0f us\n", (P50["c1","kcp"] - P50["c1","direct"]) * 1000, (P50["c1","nginx"] - P50["c1","direct"]) * 1000, (1 / R["c1","kcp"] - 1 / R["c1","direct"]) * 1e6, (1 / R["c1","nginx"] - 1 / R["c1","direct"]) * 1e6
        }
    }' "$RESULTS"

echo
awk -v k="$KCP_HWM_MAIN" -v n="$NGINX_HWM_MAIN" -v K="$KCP_HWM" -v N="$NGINX_HWM" 'BEGIN {
    printf "Peak RSS (VmHWM) after the throughput, -c1 and SSE runs: kcp %.1f MB, nginx master + workers %.1f MB\n", k / 1024, n / 1024
    printf "Peak RSS (VmHWM) after the extra rows (many connections, large bodies): kcp %.1f MB, nginx %.1f MB\n", K / 1024, N / 1024 }'
printf '%s\n' "${READY_MS[@]}" | sort -n | awk '{ v[NR] = $1 } END {
    printf "kcp start to ready (launch until GET /ready answers 200), %d starts: median %s ms, min %s ms, max %s ms\n", NR, v[int((NR + 1) / 2)], v[1], v[NR] }'

# ---- what kcp saw --------------------------------------------------------------------------
echo
echo "kcp metrics after the run (client responses by status, upstream attempts by key, retries):"
curl -s "http://127.0.0.1:$METRICS_PORT/metrics" >"$TMP/metrics.txt" || true
grep -E '^kcp_(requests_total|upstream_requests_total|retries_total)\{' "$TMP/metrics.txt" | sed 's/^/    /' || true
overhead_sum=$(awk '/^kcp_overhead_seconds_sum/ {print $2}' "$TMP/metrics.txt")
overhead_count=$(awk '/^kcp_overhead_seconds_count/ {print $2}' "$TMP/metrics.txt")
if [ -n "$overhead_count" ] && [ "${overhead_count%.*}" -gt 0 ] 2>/dev/null; then
    awk -v s="$overhead_sum" -v c="$overhead_count" \
        'BEGIN { printf "    kcp_overhead_seconds mean: %.1f us over %d requests (self-measured, up to the response head)\n", s / c * 1e6, c }'
fi
warn_lines=$(grep -c . "$TMP/kcp.err" 2>/dev/null || true)
echo "    kcp stderr lines (level warn and above): ${warn_lines:-0}"
if [ "${warn_lines:-0}" -gt 0 ]; then head -5 "$TMP/kcp.err" | sed 's/^/      /'; fi
nginx_errors=$(grep -c . "$TMP/nginx/error.log" 2>/dev/null || true)
echo "    nginx error.log lines: ${nginx_errors:-0}"
if [ "${nginx_errors:-0}" -gt 0 ]; then head -5 "$TMP/nginx/error.log" | sed 's/^/      /'; fi
