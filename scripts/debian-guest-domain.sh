#!/usr/bin/env bash
# Defines a libvirt domain of tvctl's Debian test guest (built by scripts/build-debian-guest.sh)
# on a qcow2 overlay of its own: $TVCTL_DEBIAN_GUEST_DIR/overlays/NAME.qcow2 over base.img.
# Usage: scripts/debian-guest-domain.sh NAME [VCPUS] [MEMORY_MIB]
# Idempotent: an existing domain of that name is left as it is (and so is its overlay). The
# console log goes to /var/lib/tvctl-lab/NAME.console.log. To remove one:
#   virsh destroy NAME; virsh undefine NAME; rm $TVCTL_DEBIAN_GUEST_DIR/overlays/NAME.qcow2
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
name=${1:?usage: scripts/debian-guest-domain.sh NAME [VCPUS] [MEMORY_MIB]}
vcpus=${2:-2}
mem=${3:-512}
guest="${TVCTL_DEBIAN_GUEST_DIR:-/var/lib/libvirt/images/tvctl-debian}"
lab=/var/lib/tvctl-lab
uri="${LIBVIRT_DEFAULT_URI:-qemu:///system}"

if virsh -c "$uri" dominfo "$name" >/dev/null 2>&1; then
  exit 0
fi
for f in vmlinuz initrd.img base.img; do
  [ -f "$guest/$f" ] || { echo "debian-guest-domain: $guest/$f missing: run scripts/build-debian-guest.sh" >&2; exit 1; }
done
command -v qemu-img >/dev/null || { echo "debian-guest-domain: qemu-img missing: run scripts/install-deps.sh" >&2; exit 1; }
mkdir -p "$lab" "$guest/overlays"
chmod 0755 "$lab" "$guest/overlays"
overlay="$guest/overlays/$name.qcow2"
xml=$(mktemp)
made_overlay=
# On failure, remove what this run made: the temporary XML and a new overlay.
trap 'rm -f "$xml"; [ -z "$made_overlay" ] || rm -f "$overlay"' EXIT
if [ ! -f "$overlay" ]; then
  qemu-img create -q -f qcow2 -F raw -b "$guest/base.img" "$overlay"
  made_overlay=1
fi
sed -e "s|@NAME@|$name|" -e "s|@VCPUS@|$vcpus|" -e "s|@MEMORY_MIB@|$mem|" \
    -e "s|@KERNEL@|$guest/vmlinuz|" -e "s|@INITRD@|$guest/initrd.img|" \
    -e "s|@CMDLINE@|root=/dev/vda rw console=ttyS0 quiet systemd.show_status=1 SYSTEMD_COLORS=0|" \
    -e "s|@OVERLAY@|$overlay|" \
    -e "s|@CONSOLE_LOG@|$lab/$name.console.log|g" \
    "$top/xml-templates/debian-guest.xml" > "$xml"
virsh -c "$uri" define "$xml" >/dev/null
made_overlay=
echo "debian-guest-domain: defined $name ($vcpus vCPUs, $mem MiB, overlay $overlay); console log $lab/$name.console.log"
