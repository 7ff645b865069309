#!/usr/bin/env bash
# Prepares the real-VM test (make test-vm): installs QEMU, a Debian kernel,
# busybox and friends when missing, and builds two initramfs images into
# .cache/vm/:
#   initrd-$kver.cpio.gz       busybox, the virtio modules, integration/vm/init
#                              (the guest whose disk is a ukai image);
#   initrd-host-$kver.cpio.gz  a hypervisor host with the kernel's iSCSI
#                              initiator: busybox, open-iscsi, sg3-utils,
#                              dmsetup, e2fsprogs, the iSCSI/SCSI/dm/ext4/
#                              virtio-net modules, integration/vm/init-host
#                              (a command agent on ttyS1).
# Prints kernel=, initrd= and initrd_host= lines. Idempotent: each initramfs
# is rebuilt only when its inputs changed.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cache="$top/.cache/vm"
mkdir -p "$cache"

pkgs="qemu-system-x86 linux-image-amd64 busybox-static cpio socat open-iscsi sg3-utils dmsetup e2fsprogs"
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

tmpdirs=""
trap 'rm -rf $tmpdirs' EXIT

busybox=$(command -v busybox || true)
[ -x /bin/busybox ] && busybox=/bin/busybox
[ -n "$busybox" ] || { echo "setup.sh: no busybox" >&2; exit 1; }
if ldd "$busybox" >/dev/null 2>&1; then echo "setup.sh: $busybox is not static (install busybox-static)" >&2; exit 1; fi

init="$top/integration/vm/init"
initrd="$cache/initrd-$kver.cpio.gz"
stamp=$(cat "$kernel" "$busybox" "$init" | md5sum | cut -d' ' -f1)
if [ ! -s "$initrd" ] || [ "$(cat "$initrd.stamp" 2>/dev/null)" != "$stamp" ]; then
  root=$(mktemp -d "$cache/root.XXXXXX")
  tmpdirs="$tmpdirs $root"
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
# ---- the hypervisor host's initramfs (host_test.go): the kernel's iSCSI
# initiator and the tools a host runs around it. Binaries keep their paths,
# with every library ldd lists (and the dynamic loader) at its path.
host_init="$top/integration/vm/init-host"
initrd_host="$cache/initrd-host-$kver.cpio.gz"
# Loaded in this order, each after its `modinfo -F depends` closure; crc32c
# (an alias: crc32c-intel and crc32c_generic) for ext4 and jbd2 checksums,
# the generic crct10dif and crc64-rocksoft for t10-pi (sd_mod).
host_mods="crc32c_generic crc32c crct10dif_generic crc64_rocksoft_generic scsi_mod sd_mod sg scsi_dh_alua iscsi_tcp dm_mod dm_multipath dm_round_robin dm_service_time virtio_pci virtio_net ext4"
host_bins="/usr/sbin/iscsid /usr/sbin/iscsiadm /usr/sbin/dmsetup /usr/sbin/mke2fs /usr/sbin/e2fsck /usr/sbin/dumpe2fs /usr/sbin/tune2fs /usr/sbin/debugfs"
host_bins="$host_bins $(dpkg -L sg3-utils | grep -E '^/usr/bin/(sg_|sginfo)' | sort | tr '\n' ' ')"
for b in $host_bins; do [ -x "$b" ] || { echo "setup.sh: $b missing" >&2; exit 1; }; done
host_libs=$(ldd $host_bins 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $2 ~ /^\(/ { print $1 }' | sort -u)

declare -A mod_seen=()
mod_files=() # in load order: dependencies first
mod_missing=""
add_mod() { # NAME (or alias, or file)
  local files f dep
  files=$(modinfo -k "$kver" -n "$1" 2>/dev/null || true)
  if [ -z "$files" ]; then mod_missing="$mod_missing $1"; return; fi
  for f in $files; do
    [ "$f" = "(builtin)" ] && continue # built into the kernel
    [ -n "${mod_seen[$f]:-}" ] && continue
    mod_seen[$f]=1
    for dep in $(modinfo -k "$kver" -F depends "$f" | tr ',' ' '); do add_mod "$dep"; done
    mod_files+=("$f")
  done
}
for m in $host_mods; do add_mod "$m"; done
[ -z "$mod_missing" ] || echo "setup.sh: kernel $kver has no module:$mod_missing (skipped)" >&2

stamp_host=$(cat "$kernel" "$busybox" "$host_init" "$top/integration/vm/setup.sh" /etc/iscsi/iscsid.conf /etc/mke2fs.conf \
  $host_bins $host_libs "${mod_files[@]}" | md5sum | cut -d' ' -f1)
if [ ! -s "$initrd_host" ] || [ "$(cat "$initrd_host.stamp" 2>/dev/null)" != "$stamp_host" ]; then
  root=$(mktemp -d "$cache/root-host.XXXXXX")
  tmpdirs="$tmpdirs $root"
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,run/lock/iscsi,var/lib/iscsi,etc/iscsi,lib/modules}
  ln -s ../run/lock "$root/var/lock"
  cp "$busybox" "$root/bin/busybox"
  ln -s busybox "$root/bin/sh" # /init links the other applets
  for f in $host_bins $host_libs; do
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
  done
  ln -s mke2fs "$root/usr/sbin/mkfs.ext4"
  ln -s e2fsck "$root/usr/sbin/fsck.ext4"
  cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"
  ln -s /proc/self/mounts "$root/etc/mtab"
  # iscsid accepts iscsiadm's requests only from a user it can name.
  echo "root:x:0:0:root:/tmp:/bin/sh" > "$root/etc/passwd"
  echo "root:x:0:" > "$root/etc/group"
  # iscsiadm must not try to start iscsid (the guest's agent does it).
  sed 's|^iscsid\.startup *=.*|iscsid.startup = /bin/true|' /etc/iscsi/iscsid.conf > "$root/etc/iscsi/iscsid.conf"
  grep -q '^iscsid.startup = /bin/true' "$root/etc/iscsi/iscsid.conf" || echo 'iscsid.startup = /bin/true' >> "$root/etc/iscsi/iscsid.conf"
  echo "InitiatorName=iqn.2026-11.io.ukai.test:vmhost" > "$root/etc/iscsi/initiatorname.iscsi" # init-host rewrites it
  : > "$root/modules.list"
  for f in "${mod_files[@]}"; do
    base=$(basename "$f")
    case "$f" in
      *.ko.xz) xz -dc "$f" > "$root/lib/modules/${base%.xz}"; base=${base%.xz} ;;
      *.ko.zst) zstd -qdc "$f" > "$root/lib/modules/${base%.zst}"; base=${base%.zst} ;;
      *.ko.gz) gzip -dc "$f" > "$root/lib/modules/${base%.gz}"; base=${base%.gz} ;;
      *) cp "$f" "$root/lib/modules/$base" ;;
    esac
    echo "$base" >> "$root/modules.list"
  done
  echo "$mod_missing" > "$root/modules.missing"
  install -m 0755 "$host_init" "$root/init"
  (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -6) > "$initrd_host.tmp"
  mv "$initrd_host.tmp" "$initrd_host"
  echo "$stamp_host" > "$initrd_host.stamp"
fi
ln -sf "$kernel" "$cache/vmlinuz"
ln -sf "$(basename "$initrd")" "$cache/initrd.cpio.gz"
echo "kernel=$kernel"
echo "initrd=$initrd"
echo "initrd_host=$initrd_host"
