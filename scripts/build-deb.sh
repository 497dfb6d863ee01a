#!/usr/bin/env bash
# Builds tvctl's two Debian packages with dpkg-deb alone (no debhelper, no cargo-deb):
#   tvctl_<version>_amd64.deb        the host tool: /usr/bin/tvctl, completions, man pages, docs,
#                                    the tvctl-serve unit (not enabled), and the static agent at
#                                    /usr/lib/tvctl/tvctl-agent for pushing into guests
#   tvctl-agent_<version>_amd64.deb  the static guest agent at /usr/sbin/tvctl-agent with a
#                                    systemd unit that is enabled and started where systemd runs
# into ${CARGO_TARGET_DIR:-target}/debian/. The version is Cargo.toml's.
# Needs: cargo, dpkg-dev (dpkg-shlibdeps), gzip; builds release binaries unless they are
# fresh (cargo decides). The Maintainer field is TVCTL_DEB_MAINTAINER, else git's user.name
# and user.email. Lintian: only the intended statically-linked-binary is overridden.
set -euo pipefail
umask 022
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
target="${CARGO_TARGET_DIR:-$top/target}"
out="$target/debian"
arch=$(dpkg --print-architecture)
if [ "$arch" != amd64 ]; then
  echo "build-deb: this host is $arch; the packages are amd64 only (the agent is built for x86_64)" >&2
  exit 1
fi
version=$(sed -n '/^\[package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
[ -n "$version" ] || { echo "build-deb: no version in Cargo.toml's [package]" >&2; exit 1; }
maintainer="${TVCTL_DEB_MAINTAINER:-}"
if [ -z "$maintainer" ]; then
  git_name=$(git config user.name 2>/dev/null || true)
  git_email=$(git config user.email 2>/dev/null || true)
  if [ -z "$git_name" ] || [ -z "$git_email" ]; then
    echo "build-deb: no Maintainer: set TVCTL_DEB_MAINTAINER='Name <email>' (or git's user.name and user.email)" >&2
    exit 1
  fi
  maintainer="$git_name <$git_email>"
fi
# Reproducible: file times and the changelog date come from the last commit.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"

for tool in dpkg-deb dpkg-shlibdeps gzip strip; do
  command -v "$tool" >/dev/null || {
    echo "build-deb: $tool is missing: apt-get install dpkg-dev binutils gzip" >&2
    exit 1
  }
done

# 1. The binaries: the host tool (dynamic, libvirt) and the agent, static, exactly as
#    scripts/build-guest.sh builds it.
echo "build-deb: building tvctl (release)"
cargo build --quiet --release --bin tvctl
host_bin="$target/release/tvctl"
echo "build-deb: building the static tvctl-agent (release)"
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" cargo build --quiet --release \
  --no-default-features --bin tvctl-agent --target x86_64-unknown-linux-gnu
agent_bin="$target/x86_64-unknown-linux-gnu/release/tvctl-agent"
ldd_says=$(LC_ALL=C ldd "$agent_bin" 2>&1 || true)
if ! grep -q "not a dynamic executable" <<<"$ldd_says"; then
  echo "build-deb: $agent_bin is not static (ldd: $ldd_says): check RUSTFLAGS and the target" >&2
  exit 1
fi

work="$out/work"
rm -rf "$work"
mkdir -p "$work" "$out"

# Installs $1 as $2 (a path inside a package root) with mode $3.
put() { install -D -m "$3" "$1" "$2"; }

# Writes the Debian changelog (native package) and copyright for package $1 into $2.
doc_files() {
  local pkg=$1 doc=$2
  mkdir -p "$doc"
  {
    echo "$pkg ($version) unstable; urgency=medium"
    echo
    echo "  * Built by scripts/build-deb.sh from tvctl $version ($(git rev-parse --short HEAD 2>/dev/null || echo 'no git'))."
    echo
    echo " -- $maintainer  $(LC_ALL=C date -R -u -d "@$SOURCE_DATE_EPOCH")"
  } | gzip -9n > "$doc/changelog.gz"
  cat > "$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tvctl

Files: *
Copyright: $(date -u -d "@$SOURCE_DATE_EPOCH" +%Y) the tvctl developers
License: GPL-2
 This program is free software; you can redistribute it and/or modify it under
 the terms of the GNU General Public License version 2 as published by the Free
 Software Foundation (GPL-2.0-only).
 .
 This program is distributed in the hope that it will be useful, but WITHOUT ANY
 WARRANTY; without even the implied warranty of MERCHANTABILITY or FITNESS FOR A
 PARTICULAR PURPOSE. See the GNU General Public License for more details.
 .
 On Debian systems, the full text of the GNU General Public License version 2
 can be found in /usr/share/common-licenses/GPL-2.
EOF
  chmod 0644 "$doc/changelog.gz" "$doc/copyright"
}

# Overrides lintian's statically-linked-binary for $2 in package $1: the agent is static on
# purpose, so that it runs in any guest with no library of the guest.
static_override() {
  mkdir -p "$work/$1/usr/share/lintian/overrides"
  printf '# static on purpose: the guest agent must run in guests without our libraries\n%s: statically-linked-binary [%s]\n' \
    "$1" "$2" > "$work/$1/usr/share/lintian/overrides/$1"
  chmod 0644 "$work/$1/usr/share/lintian/overrides/$1"
}

# Finishes package root $1: md5sums, Installed-Size, times; then builds $2.
build_package() {
  local root=$1 deb=$2
  (cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z \
     | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
  chmod 0644 "$root/DEBIAN/md5sums"
  local size
  size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
  sed -i "s/^Installed-Size: .*/Installed-Size: $size/" "$root/DEBIAN/control"
  find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  dpkg-deb --build --root-owner-group -Zxz "$root" "$deb" >/dev/null
  echo "build-deb: $deb"
}

# 2. tvctl (host).
root="$work/tvctl"
put "$host_bin" "$root/usr/bin/tvctl" 0755
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/tvctl"
put "$agent_bin" "$root/usr/lib/tvctl/tvctl-agent" 0755
strip --strip-unneeded --remove-section=.comment "$root/usr/lib/tvctl/tvctl-agent"
comp="$work/completions"
mkdir -p "$comp"
"$root/usr/bin/tvctl" completions bash > "$comp/tvctl"
"$root/usr/bin/tvctl" completions zsh > "$comp/_tvctl"
"$root/usr/bin/tvctl" completions fish > "$comp/tvctl.fish"
put "$comp/tvctl" "$root/usr/share/bash-completion/completions/tvctl" 0644
put "$comp/_tvctl" "$root/usr/share/zsh/vendor-completions/_tvctl" 0644
put "$comp/tvctl.fish" "$root/usr/share/fish/vendor_completions.d/tvctl.fish" 0644
mkdir -p "$root/usr/share/man/man1"
"$root/usr/bin/tvctl" -q man --out-dir "$work/man"
for page in "$work"/man/*.1; do
  gzip -9n -c "$page" > "$root/usr/share/man/man1/$(basename "$page").gz"
  chmod 0644 "$root/usr/share/man/man1/$(basename "$page").gz"
done
doc="$root/usr/share/doc/tvctl"
doc_files tvctl "$doc"
put README.md "$doc/README.md" 0644
for f in docs/*.md; do put "$f" "$doc/$(basename "$f")" 0644; done
put packaging/systemd/tvctl-serve.service "$root/lib/systemd/system/tvctl-serve.service" 0644
static_override tvctl usr/lib/tvctl/tvctl-agent

# Depends from the libraries the binary links (libvirt0, libc6, ...), as debhelper would.
mkdir -p "$work/shlibs/debian"
printf 'Source: tvctl\n\nPackage: tvctl\nArchitecture: any\n' > "$work/shlibs/debian/control"
depends=$(cd "$work/shlibs" && dpkg-shlibdeps -O -e"$root/usr/bin/tvctl" 2>/dev/null \
  | sed -n 's/^shlibs:Depends=//p')
[ -n "$depends" ] || { echo "build-deb: dpkg-shlibdeps found no dependencies of tvctl" >&2; exit 1; }
mkdir -p "$root/DEBIAN"
cat > "$root/DEBIAN/control" <<EOF
Package: tvctl
Version: $version
Architecture: amd64
Maintainer: $maintainer
Installed-Size: 0
Depends: $depends
Recommends: trace-cmd
Suggests: libvirt-daemon-system, kernelshark
Section: admin
Priority: optional
Description: trace libvirt/QEMU guests from the host over virtio-serial
 tvctl records ftrace events of libvirt/QEMU guests in one command: it gives
 a domain virtio-serial channels (tvctl setup), drives a small static agent
 inside the guest, and writes trace.dat files that trace-cmd report and
 KernelShark open, merged with the host's own trace on one timeline.
 .
 This package holds the host tool, its man pages and shell completions, the
 tvctl-serve systemd unit (not enabled) and a copy of the static guest agent
 in /usr/lib/tvctl for installing into guests.
EOF
build_package "$root" "$out/tvctl_${version}_${arch}.deb"

# 3. tvctl-agent (guest): static, no dependencies. The unit is guest/tvctl-agent.service with
#    the packaged path (that file keeps /usr/local/bin for installs by hand).
root="$work/tvctl-agent"
put "$agent_bin" "$root/usr/sbin/tvctl-agent" 0755
strip --strip-unneeded --remove-section=.comment "$root/usr/sbin/tvctl-agent"
mkdir -p "$root/lib/systemd/system"
{
  echo "# systemd unit for tvctl-agent, installed by the tvctl-agent package (enabled on install)."
  grep -v '^#' guest/tvctl-agent.service | sed -e 's|^ExecStart=/usr/local/bin/tvctl-agent|ExecStart=/usr/sbin/tvctl-agent|' \
    -e 's|^\[Unit\]$|[Unit]\nDocumentation=man:tvctl-agent(8)|'
} > "$root/lib/systemd/system/tvctl-agent.service"
chmod 0644 "$root/lib/systemd/system/tvctl-agent.service"
grep -q '^ExecStart=/usr/sbin/tvctl-agent$' "$root/lib/systemd/system/tvctl-agent.service" || {
  echo "build-deb: guest/tvctl-agent.service has no ExecStart=/usr/local/bin/tvctl-agent to rewrite" >&2
  exit 1
}
doc_files tvctl-agent "$root/usr/share/doc/tvctl-agent"
static_override tvctl-agent usr/sbin/tvctl-agent
# A short man page from the agent's own --help (it has no clap, so no clap_mangen).
mkdir -p "$root/usr/share/man/man8"
{
  echo ".TH TVCTL-AGENT 8 \"$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)\" \"tvctl-agent $version\""
  echo ".SH NAME"
  echo "tvctl-agent \\- guest agent of tvctl: records ftrace events when the host asks"
  echo ".SH SYNOPSIS"
  echo ".nf"
  "$root/usr/sbin/tvctl-agent" --help | sed -e 's/\\/\\e/g' -e 's/^\./\\\&./'
  echo ".fi"
  echo ".SH SEE ALSO"
  echo "tvctl(1) on the host; /usr/share/doc/tvctl/protocol.md in the tvctl package."
} | gzip -9n > "$root/usr/share/man/man8/tvctl-agent.8.gz"
chmod 0644 "$root/usr/share/man/man8/tvctl-agent.8.gz"
mkdir -p "$root/DEBIAN"
cat > "$root/DEBIAN/control" <<EOF
Package: tvctl-agent
Version: $version
Architecture: amd64
Maintainer: $maintainer
Installed-Size: 0
Section: admin
Priority: optional
Description: guest agent of tvctl (ftrace over virtio-serial)
 tvctl-agent runs inside a libvirt/QEMU guest and records ftrace events when
 tvctl on the host asks, splicing each CPU's ring-buffer pages to a
 virtio-serial port. It is one static binary with no library dependencies;
 the packaged systemd unit starts it at boot.
EOF
# Maintainer scripts as debhelper (dh_installsystemd) generates them: enabling works in a
# chroot too (deb-systemd-helper only makes symlinks); starting and stopping only where
# systemd runs. Without init-system-helpers (a guest without systemd) they do nothing.
cat > "$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ]; then
	if command -v deb-systemd-helper >/dev/null 2>&1; then
		# Only removes masks deb-systemd-helper made when the package was removed.
		deb-systemd-helper unmask 'tvctl-agent.service' >/dev/null || true
		# was-enabled is true on a first installation, so that enables the unit.
		if deb-systemd-helper --quiet was-enabled 'tvctl-agent.service'; then
			deb-systemd-helper enable 'tvctl-agent.service' >/dev/null || true
		else
			deb-systemd-helper update-state 'tvctl-agent.service' >/dev/null || true
		fi
	fi
	if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		if [ -n "$2" ]; then
			_action=restart
		else
			_action=start
		fi
		deb-systemd-invoke $_action 'tvctl-agent.service' >/dev/null || true
	fi
fi
exit 0
EOF
cat > "$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -z "${DPKG_ROOT:-}" ] && [ "$1" = remove ] && [ -d /run/systemd/system ]; then
	deb-systemd-invoke stop 'tvctl-agent.service' >/dev/null || true
fi
exit 0
EOF
cat > "$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -z "${DPKG_ROOT:-}" ] && [ "$1" = remove ] && [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = "remove" ] && command -v deb-systemd-helper >/dev/null 2>&1; then
	deb-systemd-helper mask 'tvctl-agent.service' >/dev/null || true
fi
if [ "$1" = "purge" ] && command -v deb-systemd-helper >/dev/null 2>&1; then
	deb-systemd-helper purge 'tvctl-agent.service' >/dev/null || true
	deb-systemd-helper unmask 'tvctl-agent.service' >/dev/null || true
fi
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
build_package "$root" "$out/tvctl-agent_${version}_${arch}.deb"
rm -rf "$work"
