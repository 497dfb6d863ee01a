#!/usr/bin/env bash
# Builds tvctl's Debian test guest (docs/testing.md, "The Debian guest tier") from Debian's
# packages only: a minimal Debian 12 (bookworm) with systemd, udev, the cloud kernel and
# qemu-guest-agent, and nothing of tvctl's: tests install tvctl-agent through qemu-ga, as a user
# would. The root file system is made by debootstrap in a folder and written into a raw ext4
# image by `mkfs.ext4 -d`: no loop mounts, no image tools beyond e2fsprogs.
# Output: $TVCTL_DEBIAN_GUEST_DIR (default /var/lib/libvirt/images/tvctl-debian), readable by
# QEMU's user: vmlinuz and initrd.img (the guest's own, booted directly by QEMU), base.img (raw
# ext4, sparse; each domain gets a qcow2 overlay on it, scripts/debian-guest-domain.sh) and
# kernel-release.
# The cache in .cache/debian-guest has one stage per step, each keyed on what goes into it:
# debootstrap (suite, mirror, package list), the configured root (the versions debootstrap
# installed plus the text of configure_rootfs below), the image (that key plus the size). A
# second run with nothing changed takes seconds; delete .cache/debian-guest to fetch newer
# packages.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cache="$top/.cache/debian-guest"
out="${TVCTL_DEBIAN_GUEST_DIR:-/var/lib/libvirt/images/tvctl-debian}"
suite=bookworm
mirror="${TVCTL_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
image_size=2G

# What the guest holds besides debootstrap's minbase (essential + apt). systemd-sysv makes
# systemd PID 1; udev starts qemu-guest-agent when its virtio port appears; initramfs-tools
# builds the initrd that loads virtio_blk (a module in Debian's kernel) before the root mounts.
# dbus (and with it systemd-logind): qemu-ga's guest-shutdown runs `shutdown -r +0`, which
# systemd's shutdown hands to logind over D-Bus; without dbus `virsh reboot` and `virsh
# shutdown` did nothing (and qemu-ga's guest-shutdown sends no reply, so nobody is told).
PKGS=(systemd systemd-sysv udev dbus kmod initramfs-tools linux-image-cloud-amd64 qemu-guest-agent)

# Units masked because a throwaway test guest has no use for them and under TCG every unit
# costs boot time. Names that do not exist in the image are masked all the same (harmless).
MASK=(
  apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer man-db.timer fstrim.timer
  e2scrub_all.timer e2scrub_reap.service systemd-timesyncd.service
  systemd-firstboot.service systemd-hwdb-update.service systemd-journal-catalog-update.service
  getty@tty1.service
)

die() { echo "build-debian-guest: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, file owners in the image); re-run with sudo"
if ! command -v debootstrap >/dev/null || ! command -v mkfs.ext4 >/dev/null; then
  echo "build-debian-guest: installing debootstrap and e2fsprogs"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends debootstrap e2fsprogs >/dev/null
fi
mkdir -p "$cache"

# A failed step leaves only *.tmp behind, and the trap removes those. debootstrap and the
# initramfs step mount /proc (and perhaps more) inside the tree: unmount everything under a
# temporary tree first, and never let rm cross into another file system.
cleanup() {
  local m
  for m in $(findmnt -rn -o TARGET | grep "^$cache/" | sort -r); do
    umount -l "$m" || true
  done
  if findmnt -rn -o TARGET | grep -q "^$cache/"; then
    echo "build-debian-guest: mounts left under $cache; not deleting the temporary trees" >&2
    return
  fi
  rm -rf --one-file-system "$cache"/*.tmp "$out"/*.tmp
}
trap cleanup EXIT

key_of() { sha256sum | cut -c1-16; }
stage_done() { [ "$(cat "$cache/$1.key" 2>/dev/null)" = "$2" ] && [ -e "$cache/$1" ]; }

# 1. debootstrap into a folder: minutes, once.
boot_key=$(printf '%s\n' "$suite" "$mirror" minbase "${PKGS[@]}" | key_of)
if ! stage_done bootstrap "$boot_key"; then
  echo "build-debian-guest: debootstrap $suite from $mirror (a few minutes)"
  rm -rf --one-file-system "$cache/bootstrap.tmp"
  debootstrap --variant=minbase --include="$(IFS=,; echo "${PKGS[*]}")" \
    "$suite" "$cache/bootstrap.tmp" "$mirror" > "$cache/debootstrap.log" 2>&1 \
    || { tail -n 30 "$cache/debootstrap.log" >&2
         die "debootstrap failed (whole log: $cache/debootstrap.log); is $mirror reachable?"; }
  # The old tree goes only now: a failed run leaves the last good cache as it was.
  rm -rf --one-file-system "$cache/bootstrap"
  mv "$cache/bootstrap.tmp" "$cache/bootstrap"
  echo "$boot_key" > "$cache/bootstrap.key"
fi
# What debootstrap installed, name and version: the later stages are keyed on this, so a
# rebuild that fetched newer packages makes a new image (and one that did not changes nothing).
pkgs_id=$(dpkg-query --admindir="$cache/bootstrap/var/lib/dpkg" -W | key_of)

# Turns the debootstrapped tree $1 into the test guest's root.
configure_rootfs() {
  local root=$1 u
  echo tvctl-debian > "$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\ttvctl-debian\n' > "$root/etc/hosts"
  # Pass 0: the root is a fresh overlay each time, and fsck would cost boot time.
  printf '/dev/vda\t/\text4\trw,errors=remount-ro\t0\t0\n' > "$root/etc/fstab"
  # Root stays locked (debootstrap's '*'): nothing logs in; tests go through qemu-ga.
  # A fixed machine-id: with none, systemd treats every boot as the first. The guests have no
  # network, so sharing one id between overlays does no harm.
  echo 3a7c0d5e9b2f4c6d8e1f2a3b4c5d6e7f > "$root/etc/machine-id"
  for u in "${MASK[@]}"; do
    ln -sfn /dev/null "$root/etc/systemd/system/$u"
  done
  # A small initrd (decompressed under TCG on every boot): the modules to reach /dev/vda only.
  # ext4 is built into Debian's kernel.
  printf 'MODULES=list\n' > "$root/etc/initramfs-tools/conf.d/tvctl.conf"
  printf 'RESUME=none\n' > "$root/etc/initramfs-tools/conf.d/resume"
  printf 'virtio_pci\nvirtio_blk\n' > "$root/etc/initramfs-tools/modules"
  mount -t proc proc "$root/proc"
  chroot "$root" update-initramfs -u -k all > "$cache/update-initramfs.log" 2>&1 \
    || { umount "$root/proc"; cat "$cache/update-initramfs.log" >&2; die "update-initramfs failed in the guest root"; }
  umount "$root/proc"
  # debootstrap keeps the .debs it installed: 100+ MB the image does not need.
  rm -f "$root"/var/cache/apt/archives/*.deb
  rm -rf "$root"/var/lib/apt/lists/*
}

# 2. The configured root: a copy of the debootstrapped tree, configured. Seconds.
root_key=$( (echo "$pkgs_id"; declare -f configure_rootfs; printf '%s\n' "${MASK[@]}") | key_of)
if ! stage_done rootfs "$root_key"; then
  echo "build-debian-guest: configuring the guest root"
  rm -rf --one-file-system "$cache/rootfs.tmp"
  cp -a "$cache/bootstrap" "$cache/rootfs.tmp"
  configure_rootfs "$cache/rootfs.tmp"
  if find "$cache/rootfs.tmp" -xdev -name 'tvctl-agent*' | grep -q .; then
    die "the guest root holds a tvctl-agent; the tests must install it themselves"
  fi
  rm -rf --one-file-system "$cache/rootfs"
  mv "$cache/rootfs.tmp" "$cache/rootfs"
  echo "$root_key" > "$cache/rootfs.key"
fi
root="$cache/rootfs"
kvers=$(ls "$root/lib/modules")
[ "$(wc -w <<<"$kvers")" = 1 ] || die "expected one kernel in the guest root, found: $kvers; delete $cache"
kver=$kvers
[ -f "$root/boot/vmlinuz-$kver" ] && [ -f "$root/boot/initrd.img-$kver" ] \
  || die "$root/boot lacks vmlinuz-$kver or initrd.img-$kver; delete $cache and run again"

# 3. The image: raw ext4, sparse, filled from the folder by mkfs.ext4 -d (e2fsprogs >= 1.43).
image_key=$(printf '%s\n' "$root_key" "$image_size" | key_of)
if ! stage_done base.img "$image_key"; then
  echo "build-debian-guest: writing the $image_size ext4 image"
  rm -f "$cache/base.img.tmp"
  mkfs.ext4 -q -F -L tvctl-debian -d "$root" "$cache/base.img.tmp" "$image_size" >/dev/null \
    || die "mkfs.ext4 -d failed; it needs e2fsprogs >= 1.43 (apt-get install e2fsprogs)"
  mv "$cache/base.img.tmp" "$cache/base.img"
  echo "$image_key" > "$cache/base.img.key"
fi

# 4. Install where QEMU (running as libvirt-qemu) can read it, unless already there.
mkdir -p "$out"
chmod 0755 "$out"
if [ "$(cat "$out/.build-key" 2>/dev/null)" = "$image_key" ] \
   && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ -f "$out/base.img" ]; then
  echo "build-debian-guest: $out is up to date ($kver)"
  exit 0
fi
install -m 0644 "$root/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
install -m 0644 "$root/boot/initrd.img-$kver" "$out/initrd.img.tmp"
cp --sparse=always "$cache/base.img" "$out/base.img.tmp"
chmod 0644 "$out/base.img.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initrd.img.tmp" "$out/initrd.img"
# Overlays made on the old image stay open on it (its inode lives on); new ones use this one.
mv "$out/base.img.tmp" "$out/base.img"
echo "$kver" > "$out/kernel-release"
chmod 0644 "$out/kernel-release"
echo "$image_key" > "$out/.build-key"
echo "build-debian-guest: $out/{vmlinuz,initrd.img,base.img} ready ($kver)"
