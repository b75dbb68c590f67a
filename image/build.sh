#!/usr/bin/env bash
# Builds the voicegate appliance disk image: a GPT raw image (plus .img.zst) to write to a
# disk with dd or balenaEtcher. Standard Debian tools only: no Docker, no loop devices, no
# mounts (debootstrap, mke2fs -d, mkfs.vfat + mtools, systemd-boot, sfdisk, dd).
#
#   sudo image/build.sh x86_64            # or aarch64 (generic UEFI arm64; see docs/firmware.md)
#
# Layout (docs/firmware.md):
#   1 VG-BOOT  FAT32, 128 MiB  ESP: systemd-boot, kernel, initrd, and the installer's
#                              `voicegate/` folder (voicegate.toml, allow.nft, credentials/)
#   2 vg-root  ext4, read-only Debian 12 minbase with systemd, the static voicegate, its unit
#   3 vg-data  ext4, writable  /var: /var/lib/voicegate (state, call records), the journal,
#                              /var/etc/voicegate (bind-mounted on /etc/voicegate)
#
# Environment: VOICEGATE_BIN (the static binary; default: built here with the appliance
# profile), STAGE=tree (stop after the cached debootstrap tree), OUT (default image/out), CACHE (debootstrap trees, default image/.cache),
# MIRROR (default http://deb.debian.org/debian), DATA_MB (default 256; grown to fill the partition by x-systemd.growfs).
# Needs (Debian): debootstrap e2fsprogs dosfstools mtools fdisk zstd systemd (sysusers),
# kmod (depmod), systemd-boot-efi; for aarch64 on x86 also qemu-user-static with binfmt.
set -euo pipefail
ARCH=${1:?usage: $0 x86_64|aarch64}
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${OUT:-$HERE/image/out}")
CACHE=$(realpath -m "${CACHE:-$HERE/image/.cache}")
MIRROR=${MIRROR:-http://deb.debian.org/debian}
DATA_MB=${DATA_MB:-256}
ESP_MB=128
SUITE=bookworm
case "$ARCH" in
  x86_64) DEB=amd64; EFI=BOOTX64.EFI; SDBOOT=systemd-bootx64.efi; CONSOLE=ttyS0,115200
          ROOT_TYPE=4f68bce3-e8cd-4db1-96e7-fbcaf984b709 ;;
  aarch64) DEB=arm64; EFI=BOOTAA64.EFI; SDBOOT=systemd-bootaa64.efi; CONSOLE=ttyAMA0,115200
          ROOT_TYPE=b921b045-1df0-41c3-af44-4c6f280d3fae ;;
  *) echo "unknown architecture $ARCH (x86_64 or aarch64)" >&2; exit 2 ;;
esac
ESP_TYPE=c12a7328-f81f-11d2-ba4b-00a0c93ec93b
VAR_TYPE=4d21b016-b534-45c2-a9fb-5c16e091fd2d
start=$(date +%s)
log() { printf '[%4ss] %s\n' $(($(date +%s) - start)) "$*"; }

# STAGE=tree: only the cached Debian tree (step 2), e.g. in the background while the binary
# builds elsewhere (.ci/run does this).
STAGE=${STAGE:-all}

# 1. The static binary.
if [ "$STAGE" = tree ]; then
  :
elif [ -z "${VOICEGATE_BIN:-}" ]; then
  log "building voicegate (appliance profile, $ARCH-unknown-linux-musl)"
  (cd "$HERE" && cargo build --quiet --profile appliance --target "$ARCH-unknown-linux-musl")
  VOICEGATE_BIN=${CARGO_TARGET_DIR:-$HERE/target}/$ARCH-unknown-linux-musl/appliance/voicegate
fi
[ "$STAGE" = tree ] || file -L "$VOICEGATE_BIN" | grep -Eq 'static(ally linked|-pie)' \
  || { echo "$VOICEGATE_BIN is not a static binary" >&2; exit 1; }

# 2. The Debian tree (cached: debootstrap takes minutes, everything after it seconds).
BASE=$CACHE/rootfs-$ARCH
# A foreign tree (aarch64 on an x86 host): debootstrap's second stage runs the arm64
# package scripts, so the kernel must hand aarch64 ELF files to qemu-user-static. As root,
# register it when it is not: mount binfmt_misc, then update-binfmts (binfmt-support) or
# the registration line of Debian's qemu-user-static (/usr/share/binfmts/qemu-aarch64:
# the ELF64 little-endian EM_AARCH64 (0xb7) header, e_type EXEC or DYN). The F flag makes
# the kernel open the interpreter now, so it also works inside the chroot.
binfmt_register() {
  local bm=/proc/sys/fs/binfmt_misc
  if [ ! -e "$bm/register" ]; then
    log "binfmt: mounting binfmt_misc on $bm"
    mount -t binfmt_misc binfmt_misc "$bm"
  fi
  [ -e "$bm/qemu-$ARCH" ] && grep -q '^enabled' "$bm/qemu-$ARCH" && return 0
  if command -v update-binfmts >/dev/null && update-binfmts --display "qemu-$ARCH" >/dev/null 2>&1; then
    log "binfmt: update-binfmts --enable qemu-$ARCH"
    update-binfmts --enable "qemu-$ARCH"
  elif [ "$ARCH" = aarch64 ] && [ -x /usr/bin/qemu-aarch64-static ]; then
    log "binfmt: registering /usr/bin/qemu-aarch64-static for aarch64 ELF (flags F)"
    [ -e "$bm/qemu-$ARCH" ] && echo -1 >"$bm/qemu-$ARCH"
    printf '%s' ':qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' \
      >"$bm/register"
  fi
  grep -q '^enabled' "$bm/qemu-$ARCH" 2>/dev/null \
    && log "binfmt: qemu-$ARCH registered: $(grep -E '^(interpreter|flags)' "$bm/qemu-$ARCH" | tr '\n' ' ')"
}
if [ ! -x "$BASE/usr/lib/systemd/systemd" ] && [ "$(uname -m)" != "$ARCH" ]; then
  if [ "$(id -u)" = 0 ] && { [ -x "/usr/bin/qemu-$ARCH-static" ] || [ -e "/proc/sys/fs/binfmt_misc/qemu-$ARCH" ]; }; then
    binfmt_register || true
  fi
  if ! grep -qs '^enabled' "/proc/sys/fs/binfmt_misc/qemu-$ARCH"; then
    echo "debootstrap for $DEB runs its package scripts under qemu-user: install" \
      "qemu-user-static and register it (update-binfmts --enable qemu-$ARCH)" >&2
    exit 1
  fi
fi
if [ ! -x "$BASE/usr/lib/systemd/systemd" ]; then
  log "debootstrap $SUITE $DEB (minbase + systemd + kernel) into $BASE"
  rm -rf "$BASE"; mkdir -p "$CACHE"
  debootstrap --arch="$DEB" --variant=minbase \
    --include=systemd,systemd-sysv,systemd-timesyncd,systemd-resolved,udev,dbus,nftables,linux-image-$DEB,kmod,iproute2,systemd-boot-efi \
    "$SUITE" "$BASE" "$MIRROR" >"$CACHE/debootstrap-$ARCH.log"
fi
if [ "$STAGE" = tree ]; then log "tree ready: $BASE"; exit 0; fi
WORK=$OUT/work-$ARCH
R=$WORK/root
log "copying the tree"
rm -rf "$WORK"; mkdir -p "$WORK"
cp -a "$BASE" "$R"

# 3. Slim it: no docs, no apt state, no drivers a headless LAN box never loads.
rm -rf "$R"/usr/share/doc/* "$R"/usr/share/man/* "$R"/usr/share/info/* \
  "$R"/var/cache/apt/* "$R"/var/lib/apt/lists/* "$R"/var/log/*.log "$R"/var/cache/debconf/*-old
KVER=$(basename "$(ls -d "$R"/usr/lib/modules/* | sort -V | tail -1)")
for d in drivers/gpu drivers/media drivers/infiniband drivers/staging drivers/isdn \
  drivers/net/wireless drivers/bluetooth sound net/bluetooth net/mac80211 net/wireless; do
  rm -rf "$R/usr/lib/modules/$KVER/kernel/$d"
done
depmod -b "$R" "$KVER"

# 4. voicegate: binary, unit, user, directories, default config.
log "installing voicegate"
install -m0755 "$VOICEGATE_BIN" "$R/usr/bin/voicegate"
install -m0644 "$HERE/systemd/voicegate.service" "$R/usr/lib/systemd/system/voicegate.service"
install -m0644 "$HERE/systemd/voicegate.sysusers" "$R/usr/lib/sysusers.d/voicegate.conf"
install -m0644 "$HERE/systemd/voicegate.tmpfiles" "$R/usr/lib/tmpfiles.d/voicegate.conf"
install -d -m0755 "$R/usr/lib/voicegate"
install -m0755 "$HERE/image/files/import-config" "$R/usr/lib/voicegate/import-config"
install -m0644 "$HERE/image/files/voicegate.toml" "$R/usr/lib/voicegate/voicegate.toml"
install -m0644 "$HERE/image/files/allow.nft" "$R/usr/lib/voicegate/allow.nft"
install -m0644 "$HERE/image/files/voicegate-import-config.service" "$R/usr/lib/systemd/system/"
# The user exists in the read-only /etc/passwd from the start (sysusers at boot then has
# nothing to write).
systemd-sysusers --root="$R" >/dev/null
VG_GID=$(awk -F: '$1=="voicegate"{print $3}' "$R/etc/group")
VG_UID=$(awk -F: '$1=="voicegate"{print $3}' "$R/etc/passwd")
# Writable state on the data partition (/var); /etc/voicegate is a bind mount of
# /var/etc/voicegate, seeded with the default config.
install -d -m0750 -o 0 -g "$VG_GID" "$R/etc/voicegate" "$R/var/etc/voicegate"
install -d -m0700 -o 0 -g 0 "$R/var/etc/voicegate/credentials"
for c in openai elevenlabs ari; do install -m0600 /dev/null "$R/var/etc/voicegate/credentials/$c"; done
install -m0640 -o 0 -g "$VG_GID" "$HERE/image/files/voicegate.toml" "$R/var/etc/voicegate/voicegate.toml"
install -m0644 "$HERE/image/files/allow.nft" "$R/var/etc/voicegate/allow.nft"
install -d -m0750 -o "$VG_UID" -g "$VG_GID" "$R/var/lib/voicegate" "$R/var/lib/voicegate/records"

# 5. The system: fstab (read-only root), network, time, firewall, journal, no SSH.
log "configuring the system"
cat >"$R/etc/fstab" <<'EOF'
# Read-only root; everything that changes lives on the data partition (/var).
PARTLABEL=vg-root  /              ext4  ro,noatime                         0 1
PARTLABEL=vg-data  /var           ext4  rw,noatime,x-systemd.growfs        0 2
PARTLABEL=VG-BOOT  /boot/efi      vfat  rw,noatime,umask=0077,nofail       0 2
/var/etc/voicegate /etc/voicegate none  bind,x-systemd.requires-mounts-for=/var 0 0
tmpfs              /tmp           tmpfs mode=1777,nosuid,nodev,size=64M    0 0
EOF
mkdir -p "$R/boot/efi"
echo voicegate >"$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 voicegate\n::1 localhost ip6-localhost\n' >"$R/etc/hosts"
# A machine id per device: an empty file makes systemd generate one at boot (kept in /run,
# since the root is read-only).
: >"$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
ln -sf /run/systemd/resolve/stub-resolv.conf "$R/etc/resolv.conf"
install -D -m0644 "$HERE/image/files/80-dhcp.network" "$R/etc/systemd/network/80-dhcp.network"
install -d "$R/etc/systemd/journald.conf.d" "$R/etc/systemd/system/nftables.service.d"
install -m0644 "$HERE/image/files/journald.conf" "$R/etc/systemd/journald.conf.d/voicegate.conf"
install -m0644 "$HERE/image/files/nftables.conf" "$R/etc/nftables.conf"
install -m0644 "$HERE/image/files/nftables-after-config.conf" \
  "$R/etc/systemd/system/nftables.service.d/voicegate.conf"
install -d -m2755 -g "$(awk -F: '$1=="systemd-journal"{print $3}' "$R/etc/group")" "$R/var/log/journal"
# The root account stays locked (no password); the console shows boot and service status.
wants() { # wants UNIT TARGET: systemctl enable, offline
  install -d "$R/etc/systemd/system/$2.wants"
  ln -sf "/usr/lib/systemd/system/$1" "$R/etc/systemd/system/$2.wants/$1"
}
wants voicegate.service multi-user.target
wants voicegate-import-config.service sysinit.target
wants nftables.service sysinit.target
wants systemd-networkd.service multi-user.target
wants systemd-networkd-wait-online.service network-online.target
wants systemd-resolved.service multi-user.target
wants systemd-timesyncd.service sysinit.target
# No package updates on a read-only root: the image is replaced as a whole (docs/firmware.md, "Updating").
rm -f "$R"/etc/systemd/system/timers.target.wants/{apt-daily,apt-daily-upgrade,dpkg-db-backup}.timer
# Do not let systemd-update-done/ldconfig try to write the read-only /etc.
touch "$R/etc/.updated" "$R/var/.updated"

# 6. The boot partition: systemd-boot, kernel, initrd, loader entry, installer folder.
log "building the partitions"
ROOT_UUID=$(cat /proc/sys/kernel/random/uuid)
SDBOOT_EFI=$R/usr/lib/systemd/boot/efi/$SDBOOT
[ -f "$SDBOOT_EFI" ] || SDBOOT_EFI=/usr/lib/systemd/boot/efi/$SDBOOT
ESP=$WORK/esp.img
rm -f "$ESP"; mkfs.vfat -F 32 -n VG-BOOT -C "$ESP" $((ESP_MB * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$ESP" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries ::/voicegate ::/voicegate/credentials
mcopy -i "$ESP" "$SDBOOT_EFI" "::/EFI/BOOT/$EFI"
mcopy -i "$ESP" "$R/boot/vmlinuz-$KVER" ::/vmlinuz
mcopy -i "$ESP" "$R/boot/initrd.img-$KVER" ::/initrd.img
printf 'timeout 0\ndefault voicegate.conf\neditor no\n' >"$WORK/loader.conf"
printf 'title voicegate\nlinux /vmlinuz\ninitrd /initrd.img\noptions root=PARTUUID=%s ro rootwait console=tty0 console=%s systemd.show_status=1 panic=10\n' \
  "$ROOT_UUID" "$CONSOLE" >"$WORK/voicegate.conf"
mcopy -i "$ESP" "$WORK/loader.conf" ::/loader/loader.conf
mcopy -i "$ESP" "$WORK/voicegate.conf" ::/loader/entries/voicegate.conf
mcopy -i "$ESP" "$HERE/image/files/voicegate.toml" ::/voicegate/voicegate.toml.example
mcopy -i "$ESP" "$HERE/image/files/allow.nft" ::/voicegate/allow.nft.example
printf 'Put voicegate.toml (see voicegate.toml.example), allow.nft and credentials/NAME files here.\r\ndocs/firmware.md of voicegate explains each.\r\n' \
  >"$WORK/README.txt"
mcopy -i "$ESP" "$WORK/README.txt" ::/voicegate/README.txt

# 7. Root and data file systems straight from directories (mke2fs -d: no mount needed).
mv "$R/var" "$WORK/var"; mkdir -m0755 "$R/var"
ROOT_MB=$(( $(du -sm "$R" | cut -f1) * 120 / 100 + 64 ))
rm -f "$WORK/root.img" "$WORK/data.img"
mke2fs -q -t ext4 -L vg-root -i 8192 -m 0 -d "$R" "$WORK/root.img" "${ROOT_MB}M"
mke2fs -q -t ext4 -L vg-data -m 0 -d "$WORK/var" "$WORK/data.img" "${DATA_MB}M"
mv "$WORK/var" "$R/var.tree"; rmdir "$R/var"; mv "$R/var.tree" "$R/var"

# 8. The GPT disk: sfdisk on the image file, dd the partitions in place.
IMG=$OUT/voicegate-$ARCH.img
TOTAL_MB=$((1 + ESP_MB + ROOT_MB + DATA_MB + 1))
rm -f "$IMG"; truncate -s "${TOTAL_MB}M" "$IMG"
sfdisk -q "$IMG" <<EOF
label: gpt
first-lba: 2048
start=1MiB, size=${ESP_MB}MiB, type=$ESP_TYPE, name="VG-BOOT"
size=${ROOT_MB}MiB, type=$ROOT_TYPE, uuid=$ROOT_UUID, name="vg-root"
size=${DATA_MB}MiB, type=$VAR_TYPE, name="vg-data"
EOF
dd if="$ESP" of="$IMG" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$WORK/root.img" of="$IMG" bs=1M seek=$((1 + ESP_MB)) conv=notrunc,sparse status=none
dd if="$WORK/data.img" of="$IMG" bs=1M seek=$((1 + ESP_MB + ROOT_MB)) conv=notrunc,sparse status=none
rm -f "$ESP" "$WORK/root.img" "$WORK/data.img"
log "compressing"
zstd -q -f -T0 -10 "$IMG" -o "$IMG.zst"
log "done: $IMG ($(du -h --apparent-size "$IMG" | cut -f1), $(du -h "$IMG.zst" | cut -f1) zst); root tree kept in $R"
"$HERE/image/check.sh" "$IMG"
