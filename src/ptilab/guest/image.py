"""Which file is a kernel to boot: a bzImage (a kernel tree's arch/x86/boot/bzImage,
an installed /boot/vmlinuz-*) or a Debian kernel package holding one.

A bzImage opens with the x86 boot protocol's setup header
(Documentation/arch/x86/boot.rst): boot_flag 0xAA55 at 0x1FE, "HdrS" at
0x202, setup_sects at 0x1F1 and syssize (16-byte units of the protected-mode
kernel) at 0x1F4, so a file cut short shows; kernel_version at 0x20E points
(minus 0x200) at the string `uname -r` and the build line come from.
"""

from __future__ import annotations

import re
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from ptilab.errors import InputError
from ptilab.files import open_input

HEADER_END = 0x268           # boot protocol 2.12's header; version strings lie further on
SETUP_SECTS, BOOT_FLAG, MAGIC_AT, KERNEL_VERSION, SYSSIZE = 0x1F1, 0x1FE, 0x202, 0x20E, 0x1F4
AR_MAGIC = b"!<arch>\n"
MODULE = re.compile(r"/kernel/.*/([^/]+)\.ko(?:\.xz)?$")
VMLINUZ = re.compile(r"(^|/)(boot/vmlinuz-[^/]+|usr/lib/modules/[^/]+/vmlinuz)$")
# What the guest loads from the kernel's own modules when they are there: qemu_fw_cfg hands
# the kernel's VMCOREINFO to QEMU's vmcoreinfo device, which writes it into the core.
GUEST_MODULES = ("qemu_fw_cfg",)


@dataclass(frozen=True)
class KernelImage:
    """A bzImage to boot, what its header says, and where its modules are (if anywhere)."""
    path: Path
    version: str                    # the header's kernel_version string ("6.1.0-57-amd64 (debian-kernel@...) #1 ...")
    modules: list[Path] = field(default_factory=list)  # lib/modules/<release> trees
    source: str = ""                # what the user gave, when it was not the bzImage itself (a .deb)

    @property
    def release(self) -> str:
        return self.version.split()[0] if self.version else ""


def read_bzimage(path: Path) -> str:
    """The kernel_version string of a bzImage; InputError unless the file is a whole one."""
    with open_input(path) as f:
        head = f.read(0x10000)
        size = f.seek(0, 2)
    if len(head) < HEADER_END or head[MAGIC_AT:MAGIC_AT + 4] != b"HdrS":
        raise InputError(f"{path}: not a Linux kernel image (no x86 boot header \"HdrS\" at 0x202)")
    if struct.unpack_from("<H", head, BOOT_FLAG)[0] != 0xAA55:
        raise InputError(f"{path}: not a Linux kernel image (boot_flag at 0x1fe is not 0xaa55)")
    setup = ((head[SETUP_SECTS] or 4) + 1) * 512
    want = setup + struct.unpack_from("<I", head, SYSSIZE)[0] * 16
    if size < want:
        raise InputError(f"{path}: kernel image cut short: {size} bytes, its boot header announces {want}")
    at = struct.unpack_from("<H", head, KERNEL_VERSION)[0] + 0x200
    if at <= 0x200 or at >= len(head):
        return ""
    return head[at:head.find(b"\0", at)].decode("ascii", errors="replace")


def kernel_image(path: Path, unpack_to: Path) -> KernelImage:
    """The kernel to boot from what the user gave: a bzImage, or a Debian .deb
    (unpacked under unpack_to: its vmlinuz and the modules the guest loads)."""
    with open_input(path) as f:
        magic = f.read(len(AR_MAGIC))
    if magic == AR_MAGIC:
        return _from_deb(path, unpack_to)
    version = read_bzimage(path)
    return KernelImage(path, version, _modules_beside(path, version.split()[0] if version else ""))


def _modules_beside(vmlinuz: Path, release: str) -> list[Path]:
    """Where a kernel's modules are: beside an unpacked package's vmlinuz (boot/ ->
    lib/modules/<release>, or usr/lib/modules/<release>/vmlinuz itself), else the machine's."""
    vmlinuz = vmlinuz.resolve()
    if not release:
        return []
    root = vmlinuz.parent.parent
    found = [d for d in (vmlinuz.parent, root / "lib/modules" / release, root / "usr/lib/modules" / release,
                         Path("/lib/modules") / release)
             if (d / "kernel").is_dir()]
    return found[:1]


def _from_deb(deb: Path, dest: Path) -> KernelImage:
    """vmlinuz and the guest's modules out of a Debian package (ar: debian-binary,
    control.tar.*, data.tar.*), read with the standard library as dpkg-deb -x would."""
    import lzma
    import zlib

    data = _deb_data(deb)
    vmlinuz, wanted = None, {m for name in GUEST_MODULES for m in (name, name.replace("_", "-"))}
    try:
        with tarfile.open(fileobj=data, mode="r|*") as tar:
            for member in tar:
                name = _member_path(deb, member.name)
                module = MODULE.search(name)
                if not member.isfile() or not (VMLINUZ.search(name) or module and module.group(1) in wanted):
                    continue
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                if VMLINUZ.search(name):
                    vmlinuz = target
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as bad:
        raise InputError(f"{deb}: its data.tar cannot be read ({bad})") from None
    if vmlinuz is None:
        raise InputError(f"{deb}: a Debian package without a kernel image (no boot/vmlinuz-* or "
                         f"usr/lib/modules/*/vmlinuz; since 7.x linux-image-* is a shell: give linux-binary-*)")
    image = kernel_image(vmlinuz, dest)
    return KernelImage(vmlinuz, image.version, image.modules, source=str(deb))


def _member_path(deb: Path, name: str) -> str:
    """A data.tar member's path under the unpack directory; InputError for one that
    would land outside it (absolute, or climbing with ..), as dpkg refuses them."""
    from pathlib import PurePosixPath

    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise InputError(f"{deb}: data.tar member {name!r} points outside the package: refused")
    return str(path).removeprefix("./")


def _deb_data(deb: Path):
    """The data.tar member of a .deb, as a file object tarfile can stream."""
    import io

    with open_input(deb) as f:
        blob = f.read()
    at = len(AR_MAGIC)
    while at + 60 <= len(blob):
        name = blob[at:at + 16].decode(errors="replace").strip().rstrip("/")
        size_text = blob[at + 48:at + 58].strip()
        if not size_text.isdigit() or blob[at + 58:at + 60] != b"`\n":
            raise InputError(f"{deb}: a broken ar member header at byte {at}: not a Debian package")
        size = int(size_text)
        body = blob[at + 60:at + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise InputError(f"{deb}: data.tar.zst: unpack it with dpkg-deb -x and give the vmlinuz")
            return io.BytesIO(body)  # tarfile's "r|*" streams gz, bz2 and xz itself
        at += 60 + size + size % 2
    raise InputError(f"{deb}: an ar archive without data.tar: not a Debian package")
