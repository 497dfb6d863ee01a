#!/usr/bin/env bash
# Defines a libvirt domain of tvctl's built-in test guest (built by scripts/build-guest.sh).
# Usage: scripts/guest-domain.sh NAME [VCPUS] [MEMORY_MIB]
# Idempotent: an existing domain of that name is left as it is. The console log goes to
# /var/lib/tvctl-lab/NAME.console.log.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
name=${1:?usage: scripts/guest-domain.sh NAME [VCPUS] [MEMORY_MIB]}
vcpus=${2:-2}
mem=${3:-256}
guest="${TVCTL_GUEST_DIR:-/var/lib/libvirt/images/tvctl}"
lab=/var/lib/tvctl-lab
uri="${LIBVIRT_DEFAULT_URI:-qemu:///system}"

if virsh -c "$uri" dominfo "$name" >/dev/null 2>&1; then
  exit 0
fi
for f in vmlinuz initrd.img; do
  [ -f "$guest/$f" ] || { echo "guest-domain: $guest/$f missing: run scripts/build-guest.sh" >&2; exit 1; }
done
mkdir -p "$lab"
chmod 0755 "$lab"
xml=$(mktemp)
trap 'rm -f "$xml"' EXIT
sed -e "s|@NAME@|$name|" -e "s|@VCPUS@|$vcpus|" -e "s|@MEMORY_MIB@|$mem|" \
    -e "s|@KERNEL@|$guest/vmlinuz|" -e "s|@INITRD@|$guest/initrd.img|" \
    -e "s|@CMDLINE@|console=ttyS0 panic=-1 quiet|" \
    -e "s|@CONSOLE_LOG@|$lab/$name.console.log|g" \
    "$top/xml-templates/test-guest.xml" > "$xml"
virsh -c "$uri" define "$xml" >/dev/null
echo "guest-domain: defined $name ($vcpus vCPUs, $mem MiB); console log $lab/$name.console.log"
