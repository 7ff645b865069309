#!/usr/bin/env bash
# Prepares the real-VM test (make test-vm): installs QEMU, a Debian kernel,
# busybox and friends when missing, and builds a small initramfs (busybox,
# the virtio modules, integration/vm/init) into .cache/vm/. Prints the
# kernel and initramfs paths. Idempotent: the initramfs is rebuilt only
# when the kernel, busybox or the init script changed.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cache="$top/.cache/vm"
mkdir -p "$cache"

pkgs="qemu-system-x86 linux-image-amd64 busybox-static cpio socat"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup.sh: installing:$missing" >&2
  if [ "$(id -u)" -ne 0 ]; then echo "setup.sh: need root to install$missing" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends $pkgs >/dev/null || {
    apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $pkgs >/dev/null; }
fi

# The newest installed Debian kernel with its modules.
kernel=""
for k in $(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V); do
  v=${k#/boot/vmlinuz-}
  [ -d "/lib/modules/$v" ] && kernel=$k
done
[ -n "$kernel" ] || { echo "setup.sh: no /boot/vmlinuz-* with /lib/modules" >&2; exit 1; }
kver=${kernel#/boot/vmlinuz-}
[ -r "$kernel" ] || { echo "setup.sh: $kernel is not readable" >&2; exit 1; }

busybox=$(command -v busybox || true)
[ -x /bin/busybox ] && busybox=/bin/busybox
[ -n "$busybox" ] || { echo "setup.sh: no busybox" >&2; exit 1; }
if ldd "$busybox" >/dev/null 2>&1; then echo "setup.sh: $busybox is not static (install busybox-static)" >&2; exit 1; fi

init="$top/integration/vm/init"
initrd="$cache/initrd-$kver.cpio.gz"
stamp=$(cat "$kernel" "$busybox" "$init" | md5sum | cut -d' ' -f1)
if [ ! -s "$initrd" ] || [ "$(cat "$initrd.stamp" 2>/dev/null)" != "$stamp" ]; then
  root=$(mktemp -d "$cache/root.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,lib/modules}
  cp "$busybox" "$root/bin/busybox"
  ln -s busybox "$root/bin/sh" # /init links the other applets
  : > "$root/modules.list"
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    f=$(modinfo -k "$kver" -n "$m" 2>/dev/null || true)
    case "$f" in
      ""|"(builtin)") continue ;; # built into the kernel (or absent from this version)
    esac
    base=$(basename "$f")
    case "$f" in
      *.ko.xz) xz -dc "$f" > "$root/lib/modules/${base%.xz}"; base=${base%.xz} ;;
      *.ko.zst) zstd -qdc "$f" > "$root/lib/modules/${base%.zst}"; base=${base%.zst} ;;
      *.ko.gz) gzip -dc "$f" > "$root/lib/modules/${base%.gz}"; base=${base%.gz} ;;
      *) cp "$f" "$root/lib/modules/$base" ;;
    esac
    echo "$base" >> "$root/modules.list"
  done
  install -m 0755 "$init" "$root/init"
  (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -9) > "$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
  echo "$stamp" > "$initrd.stamp"
fi
ln -sf "$kernel" "$cache/vmlinuz"
ln -sf "$(basename "$initrd")" "$cache/initrd.cpio.gz"
echo "kernel=$kernel"
echo "initrd=$initrd"
