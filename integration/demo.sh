#!/usr/bin/env bash
# make demo / make demo-stop: a Consul agent and three ukai nodes (n1, n2, n3;
# zones a, a, b) on loopback, configured by configs/demo/*.yaml. The demo
# creates an image on n1, writes and reads it over iSCSI with qemu-io, shows
# the cluster, and leaves everything running until `make demo-stop`.
set -euo pipefail
cmd=${1:?start|stop}
dir=/tmp/ukai-demo # the data_dir in configs/demo/*.yaml
top=$(cd "$(dirname "$0")/.." && pwd)
ukai="$top/bin/ukai"
consul_http=127.0.0.1:18500

stop_pid() { # name pidfile
  [ -f "$2" ] || return 0
  local pid; pid=$(cat "$2")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "stopped $1 (pid $pid)"
  fi
  rm -f "$2"
}

stop_all() {
  for n in n3 n2 n1; do stop_pid "ukai $n" "$dir/$n.pid"; done
  stop_pid consul "$dir/consul.pid"
}

wait_for() { # what command...
  local what=$1; shift
  for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for $what" >&2; return 1
}

case "$cmd" in
stop)
  stop_all
  rm -rf "$dir"
  ;;
start)
  stop_all
  rm -rf "$dir"
  mkdir -p "$dir"/{n1,n2,n3,consul}
  consul=$(bash "$top/integration/get-consul.sh")
  "$consul" agent -server -bootstrap-expect 1 -data-dir "$dir/consul" -node ukai-demo \
    -bind 127.0.0.1 -client 127.0.0.1 -advertise 127.0.0.1 -http-port 18500 \
    -serf-lan-port 18301 -serf-wan-port 18302 -server-port 18300 \
    -dns-port -1 -grpc-port -1 -grpc-tls-port -1 -log-level warn >"$dir/consul.log" 2>&1 &
  echo $! > "$dir/consul.pid"
  wait_for "Consul's leader" sh -c "curl -sf http://$consul_http/v1/status/leader | grep -q 127.0.0.1"
  echo "Consul agent on $consul_http (log: $dir/consul.log)"
  for n in n1 n2 n3; do
    "$ukai" serve --config "$top/configs/demo/$n.yaml" >"$dir/$n.log" 2>&1 &
    echo $! > "$dir/$n.pid"
    api=$(awk '/^api:/{f=1} f&&/listen:/{print $2; exit}' "$top/configs/demo/$n.yaml")
    wait_for "node $n" "$ukai" --api "$api" version
  done
  export UKAI_API=127.0.0.1:17701
  wait_for "three alive nodes" sh -c "test \$('$ukai' node list -o json | grep -c '\"state\": \"alive\"') -eq 3"
  set -x
  "$ukai" node list
  "$ukai" image create demo --size 1G --block-size 4M --locations n1,n2
  "$ukai" access grant demo --initiator iqn.2008-11.org.linux-kvm   # QEMU's default initiator name
  qemu-io -f raw -c 'write -P 0xab 0 8M' -c 'write -P 0xcd 1020M 4M' iscsi://127.0.0.1:13261/iqn.2026-11.io.ukai:demo/0
  qemu-io -f raw -c 'read -P 0xab 0 8M' -c 'read -P 0xcd 1020M 4M' -c 'read -P 0 8M 1M' iscsi://127.0.0.1:13261/iqn.2026-11.io.ukai:demo/0
  "$ukai" --api 127.0.0.1:17703 image list
  "$ukai" --api 127.0.0.1:17703 image info demo
  "$ukai" --api 127.0.0.1:17703 image verify demo
  set +x
  cat <<MSG

Consul and ukai nodes n1, n2, n3 are running (logs in $dir):
  CLI:    UKAI_API=127.0.0.1:17701 $ukai node list   (n2: 17702, n3: 17703)
  iSCSI:  iscsi://127.0.0.1:13261/iqn.2026-11.io.ukai:demo/0
Stop them with: make demo-stop
MSG
  ;;
*)
  echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
