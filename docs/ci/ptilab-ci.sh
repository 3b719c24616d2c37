#!/bin/sh
# The kernel developer's gate: build a kernel tree with PTI, boot it under QEMU
# with ptilab, audit it, and fail when its user tables expose more of the kernel
# than the last release's saved view.  See docs/ci.md.
#
#   docs/ci/ptilab-ci.sh KERNEL_TREE OUT [BASELINE_VIEW]
#   PTILAB_KERNEL=vmlinuz-or.deb docs/ci/ptilab-ci.sh - OUT [BASELINE_VIEW]   # a kernel built elsewhere
#
# Writes OUT/boot/ (core.elf, QEMU's walk, console.txt, boot.json), OUT/audit.json
# and OUT/view.ptdump (this build's user view: the baseline of the next run).
# Exit 0: audited clean and nothing new exposed; 1: the audit found something
# at or above $PTILAB_FAIL_ON, or BASELINE_VIEW -> this build exposes more;
# 2: the kernel did not build, boot (panic, no user mode, silent console) or
# the inputs were bad.
set -eu

tree=${1:?usage: ptilab-ci.sh KERNEL_TREE OUT [BASELINE_VIEW]}
out=${2:?usage: ptilab-ci.sh KERNEL_TREE OUT [BASELINE_VIEW]}
baseline=${3:-}
append=${PTILAB_APPEND:-pti=on}          # the command line's ptilab part; "" leaves PTI to the kernel
fail_on=${PTILAB_FAIL_ON:-medium}
jobs=${JOBS:-$(nproc)}
mkdir -p "$out"
kernel=${PTILAB_KERNEL:-$tree/arch/x86/boot/bzImage}

# 1. A small config that has PTI: the x86-64 defconfig (serial console, initrd,
#    devtmpfs) with page-table isolation forced on (its name since 6.9 and before)
#    and fw_cfg built in, so QEMU's core carries the kernel's VMCOREINFO.
[ -n "${PTILAB_KERNEL:-}" ] || (
  cd "$tree"
  make -s x86_64_defconfig
  scripts/config -e MITIGATION_PAGE_TABLE_ISOLATION -e PAGE_TABLE_ISOLATION \
                 -e SERIAL_8250 -e SERIAL_8250_CONSOLE -e BLK_DEV_INITRD -e DEVTMPFS \
                 -e FW_CFG_SYSFS -e VMCORE_INFO -e CRASH_CORE
  make -s olddefconfig
  grep -Eq '^CONFIG_(MITIGATION_)?PAGE_TABLE_ISOLATION=y' .config \
    || { echo "ptilab-ci: this tree's config has no page-table isolation" >&2; exit 2; }
  make -s -j"$jobs" bzImage
) || exit 2

# 2. Boot it, freeze a CPU in user mode, audit the core (KVM if it works, else TCG).
status=0
ptilab boot "$kernel" --out "$out/boot" --append "$append" \
       --fail-on "$fail_on" --json > "$out/audit.json" || status=$?
[ "$status" -le 1 ] || exit "$status"
ptilab dump "$out/boot/core.elf" > "$out/view.ptdump"

# 3. What this build exposes that the release did not.
if [ -n "$baseline" ]; then
  s=0
  ptilab diff "$baseline" "$out/boot/core.elf" > "$out/diff.txt" || s=$?
  cat "$out/diff.txt"
  [ "$s" -le 1 ] || exit "$s"
  [ "$s" -eq 0 ] || status=1
else
  echo "ptilab-ci: no baseline view given: $out/view.ptdump is the first one" >&2
fi
exit "$status"
