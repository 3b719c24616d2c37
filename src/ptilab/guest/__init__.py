"""A kernel booted under QEMU and caught with a CPU in user mode.

What `ptilab boot` and the real-kernel fixture builder (tests/realkernel/build.py)
share, so there is one way to boot a kernel:

* initramfs: a gzip'd newc cpio (the format of the kernel's usr/gen_init_cpio.c)
  around a static busybox and an /init;
* modules: a Debian kernel's modules with their .modinfo depends=, as modprobe
  resolves them (qemu_fw_cfg hands the kernel's VMCOREINFO to QEMU);
* image: which file is a kernel (the x86 boot protocol's "HdrS" header), from a
  bzImage, an installed /boot/vmlinuz-* or a Debian .deb;
* qemu: QEMU started with its console on a host file and QMP on a socket, every
  wait bounded, QEMU killed on every way out;
* capture: the boot `ptilab boot` runs (the KVM probe, the freeze in user mode,
  the ELF core, QEMU's own walk and the console log in a directory).

Nothing here imports numpy: the audit of what was captured is the caller's.
"""

from ptilab.errors import PtilabError


class GuestError(PtilabError):
    """The guest did not get where it had to (panicked, hung, printed nothing), or QEMU failed: one line."""
