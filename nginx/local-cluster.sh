#!/usr/bin/env bash
# A local hub pool on loopback: redis-server, N hubs and nginx in front, all in one directory.
#
#   nginx/local-cluster.sh start [--hubs N] [--dir DIR] [--port PORT] [--redis-cluster M]
#                                                                       start everything; with
#                                                                       --redis-cluster, on a Redis
#                                                                       Cluster of M masters
#   nginx/local-cluster.sh stop --dir DIR                               stop everything
#   nginx/local-cluster.sh redis-stop --dir DIR                         SIGKILL redis, or every
#                                                                       cluster node (fault drills)
#   nginx/local-cluster.sh redis-start --dir DIR                        start it again (same socket
#                                                                       or ports, same data)
#
# `start` prints the cluster's variables and writes them to DIR/cluster.env: NGINX_ADDR, REDIS_URL
# (or REDIS_CLUSTER_NODES and REDIS_<i>_PORT),
# HUB_COUNT, HUB_<i>_ADDR, HUB_<i>_PID, and HUB_AUTH__HS256_SECRET (so `hub token` mints tokens
# the pool accepts: `set -a; . DIR/cluster.env; target/release/hub token --sub me --role viewer`).
# Clients connect to ws://NGINX_ADDR/ws?client=<id>&token=<jwt>.
# HUB_BIN picks the hub binary (default target/release/hub, built when missing).
set -euo pipefail

command=${1:-}
shift || true
hubs=3
dir=""
port=""
masters=0
while [ $# -gt 0 ]; do
  case "$1" in
    --hubs) hubs=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --redis-cluster) masters=$2; shift 2 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
root=$(cd "$(dirname "$0")/.." && pwd)

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() { # wait_for SECONDS COMMAND...
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    if [ $SECONDS -ge $deadline ]; then echo "timed out waiting for: $*" >&2; return 1; fi
    sleep 0.05
  done
}

redis_start() {
  if grep -q '^REDIS_1_PORT=' "$dir/redis.env" 2>/dev/null; then
    local i p
    while IFS='=' read -r key p; do
      i=${key#REDIS_}; i=${i%_PORT}
      redis_node_start "$i" "$p"
    done < <(grep '^REDIS_[0-9]*_PORT=' "$dir/redis.env")
    wait_for 20 cluster_ok
    return
  fi
  # Append-only with fsync on every write: an acknowledged reading survives a crash. (With
  # everysec a crash may lose the last second; hubs then detect the rewind and start a new epoch.)
  redis-server --port 0 --unixsocket "$dir/redis.sock" --unixsocketperm 700 --dir "$dir" \
    --save "" --appendonly yes --appendfsync always --daemonize no --logfile "$dir/redis.log" \
    </dev/null >/dev/null 2>&1 &
  echo $! > "$dir/redis.pid"
  wait_for 10 test -S "$dir/redis.sock"
}

redis_stop() {
  for f in "$dir"/redis-*.pid; do
    [ -f "$f" ] || continue
    kill -KILL "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  if [ -f "$dir/redis.pid" ]; then
    kill -KILL "$(cat "$dir/redis.pid")" 2>/dev/null || true
    rm -f "$dir/redis.pid" "$dir/redis.sock"
  fi
}

# One node of the Redis Cluster: node i on port p, its data and nodes.conf in DIR/redis-i, so
# it comes back as itself (same slots, same data) after redis-stop / redis-start.
redis_node_start() {
  local i=$1 p=$2
  mkdir -p "$dir/redis-$i"
  redis-server --port "$p" --bind 127.0.0.1 --dir "$dir/redis-$i" \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --save "" --appendonly yes --appendfsync always --daemonize no \
    --logfile "$dir/redis-$i/redis.log" </dev/null >/dev/null 2>&1 &
  echo $! > "$dir/redis-$i.pid"
  wait_for 10 redis_up "$p"
}

redis_up() { redis-cli -p "$1" ping >/dev/null 2>&1; }

# A Redis Cluster of $masters masters on loopback (7.0 or later: sharded pub/sub), append-only
# with fsync on every write like the single instance. Sets cluster_nodes.
redis_cluster_start() {
  local addrs=() urls=()
  for i in $(seq 1 "$masters"); do
    local p
    # The cluster bus listens on port + 10000.
    until p=$(free_port) && [ "$p" -lt 50000 ]; do :; done
    redis_node_start "$i" "$p"
    addrs+=("127.0.0.1:$p")
    urls+=("redis://127.0.0.1:$p")
    echo "REDIS_${i}_PORT=$p" >> "$dir/redis.env"
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >"$dir/redis-create.log"
  wait_for 20 cluster_ok
  cluster_nodes=$(IFS=,; echo "${urls[*]}")
}

cluster_ok() {
  local p
  for p in $(sed -n 's/^REDIS_[0-9]*_PORT=//p' "$dir/redis.env"); do
    redis-cli -p "$p" cluster info 2>/dev/null | grep -q cluster_state:ok || return 1
  done
}

hub_addr() { grep -o 'addr=[0-9.:]*' "$dir/hub-$1.log" 2>/dev/null | head -n 1 | cut -d= -f2; }
hub_listening() { [ -n "$(hub_addr "$1")" ]; }

start() {
  [ -n "$dir" ] || dir=$(mktemp -d "${TMPDIR:-/tmp}/hub-cluster.XXXXXX")
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  local hub_bin=${HUB_BIN:-$root/target/release/hub}
  if [ ! -x "$hub_bin" ]; then (cd "$root" && cargo build --release --locked -p hub); fi
  local secret
  secret=$(head -c 32 /dev/urandom | base64 | tr -d '\n=/+')
  local broker=()
  : > "$dir/redis.env"
  if [ "$masters" -gt 0 ]; then
    redis_cluster_start
    broker=(HUB_BROKER__CLUSTER_NODES="$cluster_nodes")
    echo "REDIS_CLUSTER_NODES=$cluster_nodes" >> "$dir/redis.env"
  else
    redis_start
    broker=(HUB_BROKER__URL="redis+unix://$dir/redis.sock")
    echo "REDIS_URL=redis+unix://$dir/redis.sock" >> "$dir/redis.env"
  fi

  : > "$dir/hub-upstreams.conf"
  for i in $(seq 1 "$hubs"); do
    env HUB_LISTEN=127.0.0.1:0 HUB_NODE_ID="hub-$i" "${broker[@]}" \
      HUB_AUTH__HS256_SECRET="$secret" HUB_SHUTDOWN__DRAIN_TIMEOUT=5s \
      "$hub_bin" </dev/null >/dev/null 2>"$dir/hub-$i.log" &
    echo $! > "$dir/hub-$i.pid"
  done
  {
    cat "$dir/redis.env"
    echo "HUB_COUNT=$hubs"
    echo "HUB_AUTH__HS256_SECRET=$secret"
  } > "$dir/cluster.env"
  for i in $(seq 1 "$hubs"); do
    wait_for 15 hub_listening "$i"
    echo "server $(hub_addr "$i") max_fails=2 fail_timeout=5s;" >> "$dir/hub-upstreams.conf"
    echo "HUB_${i}_ADDR=$(hub_addr "$i")" >> "$dir/cluster.env"
    echo "HUB_${i}_PID=$(cat "$dir/hub-$i.pid")" >> "$dir/cluster.env"
  done

  [ -n "$port" ] || port=$(free_port)
  echo "listen 127.0.0.1:$port backlog=4096;" > "$dir/hub-listen.conf"
  cp "$root/nginx/hub-proxy.conf" "$dir/hub-proxy.conf"
  mkdir -p "$dir/tmp"
  cat > "$dir/nginx.conf" <<CONF
# Local variant of nginx/nginx.conf: same hub-proxy.conf, paths in this directory.
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    include hub-proxy.conf;
}
CONF
  nginx -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/nginx-error.log"
  nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/nginx-error.log" -g 'daemon off;' \
    </dev/null >"$dir/nginx-access.log" 2>&1 &
  wait_for 10 test -s "$dir/nginx.pid"
  echo "NGINX_ADDR=127.0.0.1:$port" >> "$dir/cluster.env"
  echo "CLUSTER_DIR=$dir" >> "$dir/cluster.env"
  cat "$dir/cluster.env"
}

stop() {
  [ -n "$dir" ] || { echo "stop needs --dir" >&2; exit 2; }
  local pids=()
  for f in "$dir"/*.pid; do
    [ -f "$f" ] && pids+=("$(cat "$f")")
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "${pids[@]}" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
  rm -f "$dir"/*.pid
}

case "$command" in
  start) start ;;
  stop) stop ;;
  redis-stop) [ -n "$dir" ] && redis_stop ;;
  redis-start) [ -n "$dir" ] && redis_start ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
