#!/usr/bin/env bash
# stage-rootfs.sh BINARY DIR: lays out in DIR/rootfs the smallest root file system BINARY runs
# in: BINARY under /usr/local/bin, every shared library ldd names (and the loader), CA
# certificates, and /etc/passwd, /etc/group, /etc/nsswitch.conf for a user `app` (10001).
set -euo pipefail
binary=$1
out=$2/rootfs
rm -rf "$out"
mkdir -p "$out/usr/local/bin" "$out/etc/ssl/certs" "$out/tmp"
chmod 1777 "$out/tmp"
cp "$binary" "$out/usr/local/bin/"
# Debug information stays on the host; the image carries only what runs.
if command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$out/usr/local/bin/$(basename "$binary")"
fi
ldd "$binary" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
    mkdir -p "$out$(dirname "$lib")"
    cp -L "$lib" "$out$lib"
done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/"
fi
echo 'app:x:10001:10001:app:/tmp:/sbin/nologin' > "$out/etc/passwd"
echo 'app:x:10001:' > "$out/etc/group"
echo 'hosts: files dns' > "$out/etc/nsswitch.conf"
