#!/usr/bin/env bash
# Builds tvctl's built-in test guest from Debian's packages only:
#   - the Debian cloud kernel (whatever linux-image-cloud-amd64 depends on today),
#   - a busybox initramfs with the virtio modules, tracefs and guest/init,
#   - tvctl-agent, statically linked, appended as a second cpio archive (the kernel unpacks
#     concatenated archives in order, so only this small part changes when the agent does).
# Output: $TVCTL_GUEST_DIR (default /var/lib/libvirt/images/tvctl): vmlinuz, initrd.img, kernel-release.
# With TVCTL_GUEST_PEER=1 it also writes initrd-peer.img (for scripts/bench-peer.sh): the same
# archives plus one more with the host's /usr/bin/trace-cmd, the shared libraries `ldd` lists
# for it (at their paths) and the virtio_net modules. initrd.img is written exactly as without it.
# The cache in .cache/guest keeps the downloaded kernel; delete it to fetch a newer one.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cache="$top/.cache/guest"
out="${TVCTL_GUEST_DIR:-/var/lib/libvirt/images/tvctl}"
mkdir -p "$cache" "$out"

# 1. The kernel package, downloaded once.
if [ ! -f "$cache/kernel/ok" ]; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  fi
  [ -n "$pkg" ] || { echo "build-guest: cannot resolve linux-image-cloud-amd64; run apt-get update" >&2; exit 1; }
  echo "build-guest: downloading $pkg"
  rm -rf "$cache/kernel" "$cache/deb"
  mkdir -p "$cache/deb"
  (cd "$cache/deb" && apt-get download "$pkg" 2>&1 | grep -v "couldn't be accessed by user '_apt'" || true)
  deb=$(ls "$cache"/deb/*.deb)
  dpkg-deb -x "$deb" "$cache/kernel"
  rm -rf "$cache/deb"
  touch "$cache/kernel/ok"
fi
kver=$(ls "$cache/kernel/lib/modules")

# Copies module $1 of the cached kernel, decompressed, to $2/$1.ko.
copy_module() {
  local f
  f=$(find "$cache/kernel/lib/modules/$kver" -name "$1.ko*" | head -n1)
  [ -n "$f" ] || { echo "build-guest: module $1 not in $kver" >&2; exit 1; }
  case "$f" in
    *.ko) cp "$f" "$2/$1.ko" ;;
    *.ko.xz) xz -dc "$f" > "$2/$1.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$2/$1.ko" ;;
    *) echo "build-guest: unknown module format $f" >&2; exit 1 ;;
  esac
}

# 2. The base initramfs: busybox, modules, init. Rebuilt when init changes.
base="$cache/base.cpio.gz"
if [ ! -f "$base" ] || [ "$top/guest/init" -nt "$base" ] || [ "$0" -nt "$base" ]; then
  root="$cache/root"
  rm -rf "$root"
  mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,run,lib/modules}
  cp /bin/busybox "$root/bin/busybox"
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console; do
    copy_module "$m" "$root/lib/modules"
  done
  install -m 0755 "$top/guest/init" "$root/init"
  (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1 > "$base.tmp")
  mv "$base.tmp" "$base"
fi

# 3. The agent, static, as its own archive.
agent="${TVCTL_AGENT_BIN:-}"
if [ -z "$agent" ]; then
  (cd "$top" && RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" cargo build --quiet --release \
     --no-default-features --bin tvctl-agent --target x86_64-unknown-linux-gnu)
  agent="$top/target/x86_64-unknown-linux-gnu/release/tvctl-agent"
fi
ldd_says=$(LC_ALL=C ldd "$agent" 2>&1 || true)
if ! grep -q "not a dynamic executable" <<<"$ldd_says"; then
  echo "build-guest: $agent is not a static executable (ldd: $ldd_says);" >&2
  echo "  the guest has no shared libraries: build it with scripts/build-guest.sh's RUSTFLAGS" >&2
  exit 1
fi
aroot="$cache/agent-root"
rm -rf "$aroot"
mkdir -p "$aroot/bin"
install -m 0755 "$agent" "$aroot/bin/tvctl-agent"
(cd "$aroot" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1 > "$cache/agent.cpio.gz")

# 4. Install where QEMU (running as libvirt-qemu) can read it.
install -m 0644 "$cache/kernel/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
cat "$base" "$cache/agent.cpio.gz" > "$out/initrd.img.tmp"
chmod 0644 "$out/initrd.img.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initrd.img.tmp" "$out/initrd.img"
echo "$kver" > "$out/kernel-release"
chmod 0755 "$out"
echo "build-guest: $out/vmlinuz ($kver) and $out/initrd.img ready"

# 5. TVCTL_GUEST_PEER=1: initrd-peer.img = the archives above + trace-cmd and networking.
if [ "${TVCTL_GUEST_PEER:-}" = 1 ]; then
  tc=/usr/bin/trace-cmd
  [ -x "$tc" ] || { echo "build-guest: $tc missing (apt-get install trace-cmd)" >&2; exit 1; }
  ldd_tc=$(LC_ALL=C ldd "$tc")
  if grep -q "not found" <<<"$ldd_tc"; then
    echo "build-guest: ldd $tc: a library is missing:" >&2
    echo "$ldd_tc" >&2
    exit 1
  fi
  # "name => /path (addr)" and "/path (addr)" lines; linux-vdso has no file.
  libs=$( (awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$ldd_tc"; echo /lib64/ld-linux-x86-64.so.2) | LC_ALL=C sort -u)
  proot="$cache/peer-root"
  rm -rf "$proot"
  mkdir -p "$proot/usr/bin" "$proot/lib/modules"
  install -m 0755 "$tc" "$proot/usr/bin/trace-cmd"
  for l in $libs; do
    mkdir -p "$proot$(dirname "$l")"
    cp -L "$l" "$proot$l"
  done
  for m in failover net_failover virtio_net; do
    copy_module "$m" "$proot/lib/modules"
  done
  (cd "$proot" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1 > "$cache/peer.cpio.gz")
  cat "$base" "$cache/agent.cpio.gz" "$cache/peer.cpio.gz" > "$out/initrd-peer.img.tmp"
  chmod 0644 "$out/initrd-peer.img.tmp"
  mv "$out/initrd-peer.img.tmp" "$out/initrd-peer.img"
  echo "build-guest: $out/initrd-peer.img ready (trace-cmd and" $libs "; failover net_failover virtio_net)"
fi
