# Sourced by the benchmark scripts: a fresh bench domain of the built-in guest.
#
# bench_boot DOM VCPUS INITRD CMDLINE_EXTRA [DEVICES]
#   Removes an earlier DOM (tvctl teardown included) and its lab folder, defines DOM from
#   xml-templates/test-guest.xml with VCPUS, 512 MiB, the kernel next to INITRD, the kernel
#   command line `console=ttyS0 panic=-1 quiet CMDLINE_EXTRA`, the guest shell port
#   (tvctl.test.shell on $lab/shell.sock) and DEVICES (more XML for <devices>), sets it up
#   with tvctl and starts it. Uses $uri, $tvctl, $root and $lab, and the caller's die().
bench_boot() {
  local dom=$1 vcpus=$2 initrd=$3 extra=$4 more=${5:-}
  if virsh -c "$uri" dominfo "$dom" >/dev/null 2>&1; then
    virsh -c "$uri" destroy "$dom" >/dev/null 2>&1 || true
    $tvctl --dir "$root" -q teardown "$dom" >/dev/null 2>&1 || true
    virsh -c "$uri" undefine "$dom" >/dev/null
  fi
  rm -rf "$lab"
  mkdir -p "$lab"
  chmod 0755 /var/lib/tvctl-lab "$lab"
  local xml devices
  xml=$(mktemp)
  devices="<channel type='unix'><source mode='bind' path='$lab/shell.sock'/><target type='virtio' name='tvctl.test.shell'/></channel>\\
    $more\\
  </devices>"
  sed -e "s|@NAME@|$dom|" -e "s|@VCPUS@|$vcpus|" -e "s|@MEMORY_MIB@|512|" \
      -e "s|@KERNEL@|$(dirname "$initrd")/vmlinuz|" -e "s|@INITRD@|$initrd|" \
      -e "s|@CMDLINE@|console=ttyS0 panic=-1 quiet $extra|" \
      -e "s|@CONSOLE_LOG@|$lab/console.log|g" \
      -e "s|</devices>|$devices|" \
      xml-templates/test-guest.xml > "$xml"
  if ! grep -q "tvctl.test.shell" "$xml"; then
    rm -f "$xml"
    die "could not add the shell port to the domain XML"
  fi
  virsh -c "$uri" define "$xml" >/dev/null
  rm -f "$xml"
  $tvctl --dir "$root" -q setup "$dom" >/dev/null
  virsh -c "$uri" start "$dom" >/dev/null
}
