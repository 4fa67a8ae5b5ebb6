#!/usr/bin/env bash
# weir-gateway with the official OpenAI Node SDK as its client (docs/gateway.md):
#
# goodput  nginx's strict limit_req at 20 r/s (burst 0, the rig of benchmarks/goodput.cpp) in
#          front of an answer that nginx gives at once; the SDK with its default retries sends
#          whole chat completions from 8 and 32 workers, straight at nginx ("SDK alone") and
#          through weir-gateway told the limit (--rpm 1200) and discovering it. Successes and
#          429s are counted from nginx's access log; failures are the SDK's exceptions.
# memory   weir-gateway's resident memory with no connection, with N idle kept-alive ones, and
#          with N streams in flight from an upstream that sends a chunk a second.
# --check  the test ctest runs (gateway_sdk_nginx): both official SDKs through weir-gateway,
#          whole and streamed, as two tenants with different limits, against nginx's strict
#          limits (chat completions 20 r/s, messages 10 r/s) in front of a Node upstream; fails
#          unless nginx admitted at least 75% of each limit and refused at most 5% as much,
#          no request failed, and tenant B (two workers) kept to its own limit of 1/s.
#
#   benchmarks/gateway_sdk.sh [--seconds S] [--concurrency 8,32] [--rows sdk,given,discovering]
#                             [--connections N] [--skip goodput|memory] [--keep]
#   benchmarks/gateway_sdk.sh --check [--seconds S] [--keep]
#
# --keep leaves the scratch directory (nginx's access log, the gateway's output) for a look.
#
# Needs nginx, node, curl and a built build/release/examples/weir-gateway ($WEIR_GATEWAY overrides
# it); installs the pinned SDKs into build/npm as scripts/test does, unless $WEIR_NODE_MODULES
# names a directory that has them. CI runs only --check.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds= concurrency=8,32 rows=sdk,given,discovering connections=1000 skip= keep= check=
while [ $# -gt 0 ]; do
  case $1 in
    --keep) keep=1; shift; continue ;;
    --check) check=1; shift; continue ;;
    --seconds) seconds=$2 ;;
    --concurrency) concurrency=$2 ;;
    --rows) rows=$2 ;;
    --connections) connections=$2 ;;
    --skip) skip=$2 ;;
    *) echo "gateway_sdk.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift 2
done
seconds=${seconds:-$([ -n "$check" ] && echo 8 || echo 30)}
gateway_bin=${WEIR_GATEWAY:-build/release/examples/weir-gateway}
if [ -z "${WEIR_NODE_MODULES:-}" ]; then
  source scripts/lib.sh
  weir_ensure_npm_packages
fi
export NODE_PATH=${WEIR_NODE_MODULES:-$PWD/build/npm/node_modules}
client=$PWD/benchmarks/gateway_sdk.cjs
[ -x "$gateway_bin" ] || { echo "gateway_sdk.sh: build $gateway_bin first" >&2; exit 2; }
[ -d "$NODE_PATH/openai" ] || { echo "gateway_sdk.sh: no openai SDK in $NODE_PATH" >&2; exit 2; }

scratch=$(mktemp -d /tmp/weir-gateway-sdk.XXXXXX)
children=()
cleanup() {
  for pid in "${children[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "$keep" ]; then echo "logs kept in $scratch"; else rm -rf "$scratch"; fi
}
trap cleanup EXIT

wait_for_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "gateway_sdk.sh: nothing listens on port $1" >&2
  exit 1
}

# Waits until FILE has a line matching PATTERN and prints it.
wait_for_line() {
  local file=$1 pattern=$2
  for _ in $(seq 600); do
    grep -m1 -- "$pattern" "$file" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "gateway_sdk.sh: no '$pattern' in $file:" >&2
  cat "$file" >&2
  exit 1
}

# Starts weir-gateway in front of $1 with the flags after it; sets gateway_pid and gateway_url.
start_gateway() {
  local upstream=$1 log
  shift
  log=$scratch/gateway-$RANDOM.out
  "$gateway_bin" --listen 127.0.0.1:0 --upstream "$upstream" --dialect openai --quiet "$@" \
    >"$log" 2>&1 &
  gateway_pid=$!
  children+=("$gateway_pid")
  gateway_url=$(wait_for_line "$log" "base URL" | sed 's/.*base URL //')
}

stop_gateway() {
  kill "$gateway_pid"
  wait "$gateway_pid" || true
}

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# ---- goodput --------------------------------------------------------------------------------

# The strict limiter of benchmarks/goodput.cpp (its rig, with its other limiters left out) on
# /v1/ (chat completions), and a second one at 10 r/s on /v1/messages. Behind them nginx answers
# at once, or, given a port ($1), a Node upstream there does (both dialects, streams too).
nginx_rig() {
  local base=$((19400 + $$ % 400 * 5))
  backend=$base limited=$((base + 1))
  local model_server="127.0.0.1:$backend"
  [ -z "${1:-}" ] || model_server="127.0.0.1:$1"
  cat >"$scratch/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $scratch/nginx.pid;
error_log $scratch/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $scratch/body;
  proxy_temp_path $scratch/proxy;
  fastcgi_temp_path $scratch/fastcgi;
  uwsgi_temp_path $scratch/uwsgi;
  scgi_temp_path $scratch/scgi;
  log_format counts '\$msec \$status';
  limit_req_status 429;
  upstream model { server $model_server; keepalive 64; }
  server {
    listen 127.0.0.1:$backend;
    access_log off;
    default_type application/json;
    location / { return 200 '{"id":"r","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14}}'; }
  }
  limit_req_zone \$server_port zone=strict:1m rate=20r/s;
  limit_req_zone \$server_port zone=messages:1m rate=10r/s;
  server {
    listen 127.0.0.1:$limited;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;
    add_header Retry-After 1 always;
    location /v1/ {
      access_log $scratch/strict.log counts;
      limit_req zone=strict;
      proxy_pass http://model;
    }
    location /v1/messages {
      access_log $scratch/messages.log counts;
      limit_req zone=messages;
      proxy_pass http://model;
    }
  }
}
EOF
  /usr/sbin/nginx -p "$scratch" -c "$scratch/nginx.conf" >"$scratch/nginx.out" 2>&1 &
  children+=($!)
  wait_for_port "$backend"
  wait_for_port "$limited"
}

# Prints "ok 429s" from nginx's log ($3, strict.log by default) for the answers stamped from $1
# to $2 (epoch seconds).
nginx_counts() {
  awk -v from="$1" -v to="$2" '$1 >= from && $1 < to {
      if ($2 == 200) ok++; else if ($2 == 429) refused++ }
    END { printf "%d %d\n", ok, refused }' "$scratch/${3:-strict.log}"
}

goodput() {
  nginx_rig
  local upstream=http://127.0.0.1:$limited/v1
  printf '%-26s %5s %9s %9s %7s %6s  %s\n' client conc. goodput "of limit" 429s failed measured
  for row in ${rows//,/ }; do
    for conc in ${concurrency//,/ }; do
      local url=$upstream warmup=0 name
      case $row in
        sdk) name="SDK alone" ;;
        given) name="SDK via gateway, given"; start_gateway "$upstream" --rpm 1200 ;;
        discovering) name="SDK via gateway, discov."; warmup=10; start_gateway "$upstream" ;;
        *) echo "gateway_sdk.sh: unknown row '$row'" >&2; exit 2 ;;
      esac
      [ "$row" = sdk ] || url=$gateway_url
      local result started ended ok_and_429 ok refused failed from
      result=$(node "$client" load "$url" "$conc" $((seconds + warmup)))
      [ "$row" = sdk ] || stop_gateway
      started=$(sed 's/.*"started":\([0-9.]*\).*/\1/' <<<"$result")
      ended=$(sed 's/.*"ended":\([0-9.]*\).*/\1/' <<<"$result")
      failed=$(sed 's/.*"failed":\([0-9]*\).*/\1/' <<<"$result")
      from=$(awk -v s="$started" -v w="$warmup" 'BEGIN { printf "%.3f", s + w }')
      read -r ok refused < <(nginx_counts "$from" "$ended")
      awk -v name="$name" -v conc="$conc" -v ok="$ok" -v refused="$refused" -v failed="$failed" \
        -v from="$from" -v to="$ended" -v warmup="$warmup" 'BEGIN {
          rate = ok / (to - from)
          printf "%-26s %5d %7.2f/s %8.1f%% %7d %6d  %.1f s after %d s\n", name, conc, rate,
            100 * rate / 20, refused, failed, to - from, warmup }'
      grep -q '"firstFailure"' <<<"$result" &&
        sed 's/.*"firstFailure":"\([^"]*\)".*/  first failure: \1/' <<<"$result"
      sleep 2  # nginx's bucket forgets this run
    done
  done
}

# ---- memory ---------------------------------------------------------------------------------

# Starts `node gateway_sdk.cjs MODE ARGS...` holding its load until release_held; waits for it.
hold() {
  mkfifo "$scratch/hold"
  node "$client" "$@" <"$scratch/hold" >"$scratch/held.out" 2>&1 &
  held_pid=$!
  exec 4>"$scratch/hold"
  wait_for_line "$scratch/held.out" ready >/dev/null
  sleep 2  # the gateway settles: timers armed, buffers grown
}

release_held() {
  exec 4>&-
  wait "$held_pid" || true
  rm -f "$scratch/hold"
}

memory() {
  local n=$connections slow port before idle streams
  node "$client" upstream 1000 600 >"$scratch/slow.out" 2>&1 &
  children+=($!)
  port=$(wait_for_line "$scratch/slow.out" '^[0-9]')

  # A fresh gateway per measure: memory an allocator took back from a closed connection would
  # not leave the process's RSS, and would flatter the next figure.
  start_gateway "http://127.0.0.1:$port/v1" --rpm 1000000
  local host_port=${gateway_url#http://}
  host_port=${host_port%/v1}
  curl -sf "http://$host_port/health" >/dev/null
  sleep 1
  before=$(rss_kb "$gateway_pid")
  hold idle "${host_port%:*}" "${host_port#*:}" "$n"
  idle=$(rss_kb "$gateway_pid")
  release_held
  stop_gateway

  start_gateway "http://127.0.0.1:$port/v1" --rpm 1000000
  curl -sf "${gateway_url%/v1}/health" >/dev/null
  sleep 1
  local before_streams
  before_streams=$(rss_kb "$gateway_pid")
  hold streams "$gateway_url" "$n"
  streams=$(rss_kb "$gateway_pid")
  release_held
  stop_gateway

  printf 'weir-gateway resident memory (VmRSS), N = %d\n' "$n"
  printf '  no connection              %8d kB\n' "$before"
  printf '  N idle kept-alive          %8d kB  %6d bytes each\n' "$idle" \
    $(((idle - before) * 1024 / n))
  printf '  no connection (fresh)      %8d kB\n' "$before_streams"
  printf '  N streams in flight        %8d kB  %6d bytes each\n' "$streams" \
    $(((streams - before_streams) * 1024 / n))
}

# ---- check ----------------------------------------------------------------------------------

# Reads field $2 of the JSON object $1 prints at top level or as "group.field" one level down.
json_field() {
  node -e 'const v = JSON.parse(process.argv[1]);
    const [g, f] = process.argv[2].split(".");
    console.log(f === undefined ? v[g] : v[g][f] ?? "")' "$1" "$2"
}

check() {
  local port
  node "$client" upstream >"$scratch/upstream.out" 2>&1 &
  children+=($!)
  port=$(wait_for_line "$scratch/upstream.out" '^[0-9]')
  nginx_rig "$port"
  cat >"$scratch/gateway.json" <<EOF
{
  "providers": [{"name": "nginx"}],
  "models": [
    {"provider": "nginx", "id": "gpt-mini", "capability": 5, "input_price": 1, "output_price": 2,
     "requests_per_minute": 1200},
    {"provider": "nginx", "id": "claude-haiku", "capability": 5, "input_price": 1,
     "output_price": 2, "requests_per_minute": 600}
  ],
  "upstreams": [{"provider": "nginx", "base_url": "http://127.0.0.1:$limited/v1",
                 "dialects": ["openai", "anthropic"]}],
  "tenants": [
    {"name": "a", "key_env": "WEIR_CHECK_KEY_A", "requests_per_minute": 6000},
    {"name": "b", "key_env": "WEIR_CHECK_KEY_B", "requests_per_minute": 60}
  ]
}
EOF
  export WEIR_CHECK_KEY_A=sk-check-a WEIR_CHECK_KEY_B=sk-check-b KEY_A=sk-check-a KEY_B=sk-check-b
  local log=$scratch/gateway.out
  "$gateway_bin" --listen 127.0.0.1:0 --catalog "$scratch/gateway.json" --quiet --max-wait 5 \
    >"$log" 2>&1 &
  gateway_pid=$!
  children+=("$gateway_pid")
  gateway_url=$(wait_for_line "$log" "base URL" | sed 's/.*base URL //')

  local result
  result=$(node "$client" check "${gateway_url%/v1}" "$seconds")
  stop_gateway
  # Counted from the first second on (the gateway's pacing starts with the first request) to
  # the end of sending (the last answers come after it, at no load).
  local started ended from to span chat_ok chat_429 messages_ok messages_429
  started=$(json_field "$result" started)
  ended=$(json_field "$result" ended)
  from=$(awk -v s="$started" 'BEGIN { printf "%.3f", s + 1 }')
  to=$(awk -v s="$started" -v n="$seconds" 'BEGIN { printf "%.3f", s + n }')
  span=$((seconds - 1))
  read -r chat_ok chat_429 < <(nginx_counts "$from" "$to")
  read -r messages_ok messages_429 < <(nginx_counts "$from" "$to" messages.log)
  printf 'over %d s: chat completions %d admitted (%.1f%% of 20/s), %d refused; messages %d' \
    "$span" "$chat_ok" "$(awk -v n="$chat_ok" -v s="$span" 'BEGIN { print 100 * n / 20 / s }')" \
    "$chat_429" "$messages_ok"
  printf ' admitted (%.1f%% of 10/s), %d refused\n' \
    "$(awk -v n="$messages_ok" -v s="$span" 'BEGIN { print 100 * n / 10 / s }')" "$messages_429"
  echo "tenant A: $(node -e 'console.log(JSON.stringify(JSON.parse(process.argv[1]).a))' "$result")"
  echo "tenant B: $(node -e 'console.log(JSON.stringify(JSON.parse(process.argv[1]).b))' "$result")"

  local failures=() b_ok
  expect() { awk "BEGIN { exit !($1) }" || failures+=("$2"); }
  expect "$chat_ok >= 0.75 * 20 * $span" "nginx admitted under 75% of the chat limit"
  expect "$messages_ok >= 0.75 * 10 * $span" "nginx admitted under 75% of the messages limit"
  expect "$chat_429 <= 0.05 * $chat_ok" "nginx refused more than 5% as many chat requests"
  expect "$messages_429 <= 0.05 * $messages_ok" "nginx refused more than 5% as many messages"
  expect "$(json_field "$result" a.failed) == 0" \
    "tenant A had failures: $(json_field "$result" a.firstFailure)"
  expect "$(json_field "$result" a.ok) > 0 && $(json_field "$result" a.streamed) > 0" \
    "tenant A got no whole or no streamed answers"
  expect "$(json_field "$result" b.failed) == 0" \
    "tenant B had failures: $(json_field "$result" b.firstFailure)"
  # B's own limit: 1/s with a burst of 6 (a tenth of its minute), held by waiting in the gateway.
  b_ok=$(json_field "$result" b.ok)
  expect "$b_ok <= ($ended - $started) + 6 + 1" "tenant B passed its limit of 1/s"
  expect "$b_ok >= 0.5 * $span" "tenant B was starved"
  if [ ${#failures[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failures[@]}"
    keep=1
    return 1
  fi
  echo "passed"
}

echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p'))," \
  "$(/usr/sbin/nginx -v 2>&1 | sed 's/.*: //'), node $(node --version)," \
  "openai $(sed -n 's/.*"version": "\(.*\)".*/\1/p' "$NODE_PATH/openai/package.json")"
if [ -n "$check" ]; then
  check
  exit
fi
[ "$skip" = goodput ] || goodput
[ "$skip" = memory ] || memory
