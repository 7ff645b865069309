#!/usr/bin/env bash
# make demo / make demo-stop: one ukai node on loopback serving an image over
# iSCSI, written and read with qemu-io. The node keeps running after `start`.
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:-/tmp/ukai-demo}
top=$(cd "$(dirname "$0")/.." && pwd)
ukai="$top/bin/ukai"
api=127.0.0.1:17700
portal=127.0.0.1:13260
prefix=iqn.2026-11.io.ukai

stop() {
  if [ -f "$dir/ukai.pid" ]; then
    pid=$(cat "$dir/ukai.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "stopped ukai node (pid $pid)"
    fi
    rm -f "$dir/ukai.pid"
  fi
}

case "$cmd" in
stop)
  stop
  rm -rf "$dir"
  ;;
start)
  stop
  rm -rf "$dir"
  mkdir -p "$dir/n1"
  sed -e "s#data_dir: .*#data_dir: $dir/n1#" \
      -e "s#listen: 127.0.0.1:7700#listen: $api#" \
      -e "s#listen: 127.0.0.1:3260#listen: $portal#" \
      "$top/configs/node.yaml" > "$dir/n1.yaml"
  "$ukai" serve --config "$dir/n1.yaml" >"$dir/n1.log" 2>&1 &
  echo $! > "$dir/ukai.pid"
  for _ in $(seq 1 200); do
    "$ukai" --api $api version >/dev/null 2>&1 && break
    kill -0 "$(cat "$dir/ukai.pid")" 2>/dev/null || { cat "$dir/n1.log"; exit 1; }
    sleep 0.1
  done
  export UKAI_API=$api
  set -x
  "$ukai" image create demo --size 1G --block-size 4M
  qemu-io -f raw -c 'write -P 0xab 0 8M' -c 'write -P 0xcd 1020M 4M' "iscsi://$portal/$prefix:demo/0"
  qemu-io -f raw -c 'read -P 0xab 0 8M' -c 'read -P 0xcd 1020M 4M' -c 'read -P 0 8M 1M' "iscsi://$portal/$prefix:demo/0"
  iscsi-ls -s "iscsi://$portal"
  "$ukai" image list
  "$ukai" image info demo
  "$ukai" node info
  set +x
  cat <<MSG

ukai node n1 is running (log: $dir/n1.log):
  CLI:    UKAI_API=$api $ukai image list
  iSCSI:  iscsi://$portal/$prefix:demo/0
Stop it with: make demo-stop
MSG
  ;;
*)
  echo "usage: $0 start|stop [DIR]" >&2; exit 2 ;;
esac
