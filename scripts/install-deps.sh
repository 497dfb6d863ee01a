#!/usr/bin/env bash
# Installs, from Debian's packages, everything tvctl's build, demo and tests need, then makes sure
# virtlogd and libvirtd are running (these machines have no systemd). Idempotent: safe to run again.
set -euo pipefail

PKGS=(
  libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
  qemu-system-x86 trace-cmd busybox-static cpio gzip
  binutils kmod iproute2 procps
  debootstrap e2fsprogs qemu-utils   # the Debian guest: scripts/build-debian-guest.sh, overlays
  man-db dpkg-dev
)

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: must run as root (it installs packages and starts libvirtd); re-run with sudo" >&2
    exit 1
  fi
}

missing_pkgs() {
  local p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
  done
}

install_pkgs() {
  local missing
  missing=$(missing_pkgs)
  [ -z "$missing" ] && return 0
  echo "install-deps: installing:" $missing
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

running() { pgrep -x "$1" >/dev/null 2>&1; }

# Without udev nobody gives /dev/kvm Debian's owner (root:kvm 0660). libvirt then probes QEMU
# with CAP_DAC_OVERRIDE (KVM enabled) but checks /dev/kvm as QEMU's user (not usable), finds
# its capabilities cache stale on every lookup and re-probes QEMU each time: every define
# took seconds per device, minutes under load. Do what the udev rule would.
kvm_device_like_udev() {
  [ -c /dev/kvm ] || return 0
  getent group kvm >/dev/null || return 0
  if [ "$(stat -c %G:%a /dev/kvm)" != "kvm:660" ]; then
    echo "install-deps: giving /dev/kvm Debian's owner and mode (root:kvm 0660)"
    chgrp kvm /dev/kvm
    chmod 0660 /dev/kvm
  fi
}

start_daemons() {
  mkdir -p /run/libvirt
  local i
  # (Re)start inside the loop: a daemon that is still shutting down (just killed) looks
  # "running" for a moment; once it is gone it is started again.
  for i in $(seq 1 60); do
    if virsh -c qemu:///system version >/dev/null 2>&1 && running virtlogd; then
      return 0
    fi
    if ! running virtlogd; then
      echo "install-deps: starting virtlogd"
      virtlogd -d
    fi
    if ! running libvirtd; then
      echo "install-deps: starting libvirtd"
      libvirtd -d
    fi
    sleep 0.5
  done
  echo "install-deps: libvirtd did not answer on qemu:///system within 30 s." >&2
  echo "  check 'pgrep -a libvirtd' and /var/log/libvirt/libvirtd.log, then run 'libvirtd -d' by hand" >&2
  exit 1
}

need_root
install_pkgs
kvm_device_like_udev
start_daemons
