"""Is this machine's CPU affected by Meltdown, and is KASLR on? What the kernel itself said.

Page tables show what user mode could reach; whether that matters depends on
the CPU. Linux decides at boot and says so in a few places, which this module
reads and weighs, strongest first:

- ``/sys/devices/system/cpu/vulnerabilities/meltdown`` (arch/x86/kernel/cpu/bugs.c,
  cpu_show_common()): "Not affected" when the CPU lacks X86_BUG_CPU_MELTDOWN
  (even with pti=on), "Mitigation: PTI", "Vulnerable", or "Unknown (XEN PV
  detected, hypervisor mitigation required)";
- the ``bugs`` line of /proc/cpuinfo: ``cpu_meltdown`` is that bug bit itself;
- the kernel log's PTI lines (arch/x86/mm/pti.c). pti_check_boottime_disable()
  prints "disabled on command line." and "disabled on XEN PV." through
  pti_print_if_insecure(), only when the CPU *has* X86_BUG_CPU_MELTDOWN, and
  "force enabled on command line." through pti_print_if_secure(), only when it
  has *not*; pti_init() prints "enabled" whenever X86_FEATURE_PTI is set. In
  auto mode on an unaffected CPU it prints nothing at all;
- the log's CPU line (smpboot's print_cpu_info(): "CPU0: AMD EPYC Processor
  (family: 0x17, ...)"). arch/x86/kernel/cpu/common.c cpu_set_bug_bits() never
  sets X86_BUG_CPU_MELTDOWN on a vendor its cpu_vuln_whitelist marks
  NO_MELTDOWN for every family (AMD, Hygon, Zhaoxin); for Intel it depends on
  the model and on ARCH_CAPABILITIES.RDCL_NO, which no log line shows;
- the command line ("Command line: ..." in the log, /proc/cmdline live):
  ``nokaslr`` turns KASLR off.

Then, weaker than any of the kernel's words, what the user states.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Iterable

PTI_LOG_PREFIX = "Kernel/User page tables isolation: "
# cpu_vuln_whitelist: VULNWL_AMD/VULNWL_HYGON(X86_FAMILY_ANY, NO_MELTDOWN | ...), VULNWL(ZHAOXIN, ...).
NO_MELTDOWN_VENDORS = ("AMD", "Hygon", "Zhaoxin")
_CPU_LINE = re.compile(r"smpboot: CPU0: (?P<cpu>.+\(family: 0x[0-9a-f]+.*\))")
_COMMAND_LINE = re.compile(r"^Command line: (?P<cmdline>.*)$")


class Meltdown(Enum):
    """Whether the CPU speculates past the US bit (X86_BUG_CPU_MELTDOWN)."""

    AFFECTED = "affected"
    NOT_AFFECTED = "not affected"
    XEN_PV = "Xen PV guest"  # the hypervisor isolates (XPTI), not this kernel
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Evidence:
    """One thing a verdict rests on: where it was read, and what it says there."""

    source: str  # "the kernel log", "vulnerabilities/meltdown", "--cpu-meltdown", ...
    says: str    # the line as the source has it

    def __str__(self) -> str:
        return f"{self.source}: {self.says!r}"


@dataclass(frozen=True)
class Exposure:
    """What is known of the machine behind the tables.

    meltdown: the CPU's exposure, and ``meltdown_evidence`` what tells it
    (empty when UNKNOWN). cpu: the CPU as the kernel named it. kaslr: whether
    KASLR is on (None: nothing tells), with ``kaslr_evidence``. cmdline: the
    kernel command line, when known. conflicts: weaker sources that disagreed
    with the one followed.
    """

    meltdown: Meltdown = Meltdown.UNKNOWN
    meltdown_evidence: tuple[Evidence, ...] = ()
    cpu: str | None = None
    kaslr: bool | None = None
    kaslr_evidence: tuple[Evidence, ...] = ()
    cmdline: str | None = None
    conflicts: tuple[Evidence, ...] = ()

    def because(self) -> str:
        """The Meltdown verdict's evidence as one clause: "the kernel log: 'Kernel/User ...'"."""
        if not self.meltdown_evidence:
            return "nothing in the image or on the command line of ptilab says"
        return "; ".join(map(str, self.meltdown_evidence))


UNKNOWN = Exposure()


@dataclass(frozen=True)
class Reading:
    """One source's word on the CPU: its Meltdown verdict (or None) and the evidence."""

    meltdown: Meltdown | None
    evidence: Evidence


def from_sysfs(line: str) -> Reading | None:
    """vulnerabilities/meltdown's line (bugs.c cpu_show_common())."""
    line = line.strip()
    source = "vulnerabilities/meltdown"
    if line == "Not affected":
        return Reading(Meltdown.NOT_AFFECTED, Evidence(source, line))
    if line.startswith("Unknown (XEN PV"):
        return Reading(Meltdown.XEN_PV, Evidence(source, line))
    if line.startswith("Mitigation") or line.startswith("Vulnerable"):
        return Reading(Meltdown.AFFECTED, Evidence(source, line))
    return None


def from_cpuinfo(text: str) -> list[Reading]:
    """/proc/cpuinfo's first ``bugs`` line: ``cpu_meltdown`` is X86_BUG_CPU_MELTDOWN.
    Kernels before 4.15 have no such bug bit, so its absence counts only
    where the line names other bugs of that era (``spectre_v1``)."""
    bugs = [line.partition(":")[2].split() for line in text.splitlines() if line.startswith("bugs")]
    if not bugs:
        return []
    line = "bugs: " + " ".join(bugs[0])
    if "cpu_meltdown" in bugs[0]:
        return [Reading(Meltdown.AFFECTED, Evidence("/proc/cpuinfo", line))]
    if "spectre_v1" in bugs[0] or "spectre_v2" in bugs[0]:
        return [Reading(Meltdown.NOT_AFFECTED, Evidence("/proc/cpuinfo", line))]
    return []


def from_log(lines: Iterable[str]) -> list[Reading]:
    """The kernel log's word on the CPU, strongest first (see the module's
    docstring for why each line means what it does). No PTI line at all says
    nothing alone: pti_check_boottime_disable() is silent both in auto mode on
    an unaffected CPU (RDCL_NO) and on a kernel without CONFIG_PAGE_TABLE_ISOLATION."""
    pti, cpu = [], None
    for line in lines:
        text = line.partition("] ")[2] if line.startswith("[") else line
        if text.startswith(PTI_LOG_PREFIX):
            pti.append(text.strip())
        elif cpu is None and (m := _CPU_LINE.search(text)):
            cpu = m.group("cpu").strip()
    said = [t[len(PTI_LOG_PREFIX):] for t in pti]
    found: list[Reading] = []
    log = "the kernel log"
    for reason, verdict in (("disabled on XEN PV.", Meltdown.XEN_PV),
                            ("disabled on command line.", Meltdown.AFFECTED),
                            ("force enabled on command line.", Meltdown.NOT_AFFECTED)):
        if reason in said:
            found.append(Reading(verdict, Evidence(log, PTI_LOG_PREFIX + reason)))
    if "enabled" in said and "force enabled on command line." not in said:
        found.append(Reading(Meltdown.AFFECTED, Evidence(log, PTI_LOG_PREFIX + "enabled")))
    if cpu is not None:
        vendor = cpu.split()[0]
        verdict = Meltdown.NOT_AFFECTED if vendor in NO_MELTDOWN_VENDORS else None
        found.append(Reading(verdict, Evidence(log, f"smpboot: CPU0: {cpu}")))
    return found


def cpu_named(readings: Iterable[Reading]) -> str | None:
    for r in readings:
        if r.evidence.says.startswith("smpboot: CPU0: "):
            return r.evidence.says.removeprefix("smpboot: CPU0: ")
    return None


def command_line(lines: Iterable[str]) -> str | None:
    """The "Command line: ..." line setup_arch() logs first thing at boot."""
    for line in lines:
        text = line.partition("] ")[2] if line.startswith("[") else line
        if m := _COMMAND_LINE.match(text):
            return m.group("cmdline").strip()
    return None


def kaslr_from(cmdline: str | None, kernel_offset: int | None, slide: int | None) -> tuple[bool | None, tuple[Evidence, ...]]:
    """Whether KASLR is on: VMCOREINFO's KERNELOFFSET (kaslr_offset()) or a
    slide measured from symbols first, then ``nokaslr`` on the command line."""
    if kernel_offset is not None:
        return kernel_offset != 0, (Evidence("VMCOREINFO", f"KERNELOFFSET={kernel_offset:x}"),)
    if slide is not None and slide != 0:
        return True, (Evidence("the symbols", f"kernel image slid by {slide:#x}"),)
    if cmdline is not None:
        words = cmdline.split()
        words = words[:words.index("--")] if "--" in words else words
        if "nokaslr" in words:
            return False, (Evidence("the command line", "nokaslr"),)
        if slide == 0:
            return False, (Evidence("the symbols", "kernel image at its link-time address"),)
    return None, ()


def weigh(readings: Iterable[Reading], stated: Meltdown | None = None) -> tuple[Meltdown, tuple[Evidence, ...], tuple[Evidence, ...]]:
    """The verdict of the strongest source that has one (readings come strongest
    first), with every reading that agrees as its evidence and those that
    disagree as conflicts; the user's statement counts only where the kernel said nothing."""
    readings = [r for r in readings if r.meltdown is not None]
    if stated is not None:
        readings.append(Reading(stated, Evidence("--cpu-meltdown", stated.value)))
    if not readings:
        return Meltdown.UNKNOWN, (), ()
    verdict = readings[0].meltdown
    agree = tuple(r.evidence for r in readings if r.meltdown is verdict)
    disagree = tuple(r.evidence for r in readings if r.meltdown is not verdict)
    return verdict, agree, disagree


def exposure(readings: list[Reading], stated: Meltdown | None = None, cmdline: str | None = None,
             kernel_offset: int | None = None, slide: int | None = None) -> Exposure:
    """All that is known of the machine, from the readings (strongest first)."""
    meltdown, evidence, conflicts = weigh(readings, stated)
    kaslr, kaslr_evidence = kaslr_from(cmdline, kernel_offset, slide)
    return Exposure(meltdown, evidence, cpu_named(readings), kaslr, kaslr_evidence, cmdline, conflicts)


def exposure_from_log(lines: list[str], stated: Meltdown | None = None,
                      kernel_offset: int | None = None, slide: int | None = None) -> Exposure:
    """What a dump's kernel log (dmesg text lines) says of its machine."""
    return exposure(from_log(lines), stated, command_line(lines), kernel_offset, slide)
