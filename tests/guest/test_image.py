"""Which files ptilab boot takes for a kernel: the x86 boot header decides, and a .deb is read as dpkg-deb -x would."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ptilab.errors import InputError
from ptilab.guest.image import kernel_image, read_bzimage

CACHE = Path(__file__).resolve().parents[1] / "realkernel" / "out" / ".cache"
VMLINUZ = sorted(CACHE.glob("kernels/*/boot/vmlinuz-*"))
DEBS = CACHE / "debs"
needs_kernels = pytest.mark.skipif(not VMLINUZ, reason="no Debian kernels unpacked (tests/realkernel/build.py)")


def _header(setup_sects: int = 4, syssize: int = 16, magic: bytes = b"HdrS", flag: int = 0xAA55) -> bytes:
    head = bytearray(0x1000)
    head[0x1F1] = setup_sects
    struct.pack_into("<I", head, 0x1F4, syssize)
    struct.pack_into("<H", head, 0x1FE, flag)
    head[0x202:0x206] = magic
    struct.pack_into("<H", head, 0x20E, 0x300 - 0x200)
    head[0x300:0x310] = b"9.9.9-test (me)\0"
    return bytes(head)


def test_a_header_alone_says_release_and_size(tmp_path):
    path = tmp_path / "bzImage"
    path.write_bytes(_header() + b"\0" * (5 * 512 + 16 * 16 - 0x1000))
    assert read_bzimage(path) == "9.9.9-test (me)"
    assert kernel_image(path, tmp_path / "deb").release == "9.9.9-test"


@pytest.mark.parametrize("head, why", [
    (b"just some text\n" * 100, "HdrS"),
    (_header(magic=b"HdrX"), "HdrS"),
    (_header(flag=0x1234), "boot_flag"),
    (_header(syssize=1 << 20), "cut short"),
    (b"!<arch>\nnot a deb at all", "not a Debian package"),
], ids=["text", "no-HdrS", "no-boot-flag", "truncated", "ar-not-deb"])
def test_what_is_not_a_whole_kernel_image_is_refused_in_one_line(tmp_path, head, why):
    path = tmp_path / "file"
    path.write_bytes(head)
    with pytest.raises(InputError, match=why) as refused:
        kernel_image(path, tmp_path / "deb")
    assert "\n" not in str(refused.value)


@needs_kernels
@pytest.mark.parametrize("vmlinuz", VMLINUZ, ids=lambda p: p.parent.parent.name)
def test_debians_images_name_their_release_and_modules(vmlinuz, tmp_path):
    release = vmlinuz.name.removeprefix("vmlinuz-")
    image = kernel_image(vmlinuz, tmp_path)
    assert image.release == release
    assert image.modules and image.modules[0].name == release


@needs_kernels
def test_a_truncated_debian_image_is_refused(tmp_path):
    cut = tmp_path / "vmlinuz"
    cut.write_bytes(VMLINUZ[0].read_bytes()[: VMLINUZ[0].stat().st_size // 2])
    with pytest.raises(InputError, match="cut short"):
        kernel_image(cut, tmp_path / "deb")


@pytest.mark.skipif(not list(DEBS.glob("linux-image-6.1.0-*-cloud-amd64_*.deb")), reason="no cloud .deb cached")
def test_a_debian_package_gives_its_vmlinuz_and_qemu_fw_cfg(tmp_path):
    deb = sorted(DEBS.glob("linux-image-6.1.0-*-cloud-amd64_*.deb"))[-1]
    image = kernel_image(deb, tmp_path)
    assert image.source == str(deb) and image.release.endswith("-cloud-amd64")
    assert image.path.name == f"vmlinuz-{image.release}"
    assert list(image.modules[0].glob("kernel/**/qemu_fw_cfg.ko*"))


@pytest.mark.skipif(not list(DEBS.glob("linux-image-7.*_*.deb")), reason="no 7.x .deb cached")
def test_debians_7_x_image_shell_is_refused_naming_linux_binary(tmp_path):
    deb = sorted(DEBS.glob("linux-image-7.*_*.deb"))[-1]
    with pytest.raises(InputError, match="linux-binary-"):
        kernel_image(deb, tmp_path)


def _deb(path: Path, data: bytes, size_field: bytes | None = None) -> Path:
    """An ar archive as dpkg-deb builds one: debian-binary, then data.tar.gz holding data."""
    def member(name: bytes, body: bytes, size: bytes | None = None) -> bytes:
        size = size or str(len(body)).encode()
        head = name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        return head + size.ljust(10) + b"`\n" + body + b"\n" * (len(body) % 2)
    path.write_bytes(b"!<arch>\n" + member(b"debian-binary", b"2.0\n") + member(b"data.tar.gz", data, size_field))
    return path


def _tar_gz(*names: str, body: bytes = b"x") -> bytes:
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


@pytest.mark.parametrize("name", ["/tmp/boot/vmlinuz-9.9.9", "./../../boot/vmlinuz-9.9.9",
                                  "usr/lib/modules/../../../../x/kernel/drivers/qemu_fw_cfg.ko"])
def test_a_package_member_outside_the_unpack_directory_is_refused(tmp_path, name):
    deb = _deb(tmp_path / "evil.deb", _tar_gz(name, body=_header()))
    with pytest.raises(InputError, match="points outside the package") as refused:
        kernel_image(deb, tmp_path / "unpack")
    assert "\n" not in str(refused.value)
    assert [p.name for p in tmp_path.rglob("*")] == ["evil.deb"]  # nothing written anywhere


@pytest.mark.parametrize("data, size, why", [
    (b"\x1f\x8b\x08\0garbage, not deflate", None, "cannot be read"),
    (_tar_gz("boot/vmlinuz-9.9.9")[:40], None, "cannot be read"),
    (b"", b"12ab", "broken ar member header"),
], ids=["bad-gzip", "cut-tar", "size-not-a-number"])
def test_a_broken_package_is_refused_in_one_line(tmp_path, data, size, why):
    deb = _deb(tmp_path / "broken.deb", data, size)
    with pytest.raises(InputError, match=why) as refused:
        kernel_image(deb, tmp_path / "unpack")
    assert "\n" not in str(refused.value)
