"""Cycles from events: what the MMU model counts (CR3 writes, second-level
TLB hits, page-walk loads and where they were served, INVPCID, INVLPG),
each multiplied by a latency a published source gives for one core.

The law the model keeps, and tests/mmu/test_cycles.py holds it to: the
cycles of a run are the sum over its events of count x latency, nothing
else. A latency no source gave is None and its term is refused, never
guessed: the entry and exit instructions (SYSCALL, SYSRET, SWAPGS, IRET)
have no published figure the project found, and they are the same in every
PTI configuration, so they stay inside the measured base cost of a call
(ptilab.mmu.overhead) instead of being a term here.

Each Preset names the TLB hierarchy it runs (ptilab.mmu.tlb.CORES), its
clock and its latencies with their sources; docs/design.md lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ptilab.errors import UsageError, one_of

# The terms, in the order tables print them.
CR3_FLUSH = "cr3_flush"  # MOV to CR3 that invalidates (no PCID, or NOFLUSH clear)
CR3_NOFLUSH = "cr3_noflush"  # MOV to CR3 with bit 63 set under CR4.PCIDE
STLB_HIT = "stlb_hit"  # first-level miss found in the second-level TLB
STLB_MISS = "stlb_miss"  # a page walk: the second-level lookup that missed before it (same latency as a hit)
WALK_LOAD_L1 = "walk_load_l1"  # a page-walk load hitting the L1 data cache
WALK_LOAD_L2 = "walk_load_l2"  # a page-walk load the modelled L1D missed: served by L2
INVPCID = "invpcid"
INVLPG = "invlpg"
TERMS = (CR3_FLUSH, CR3_NOFLUSH, STLB_HIT, STLB_MISS, WALK_LOAD_L1, WALK_LOAD_L2, INVPCID, INVLPG)


@dataclass(frozen=True)
class Latency:
    cycles: float | None  # None: no source found; the term cannot be costed
    source: str


@dataclass(frozen=True)
class Preset:
    """One core: its TLBs (a name in ptilab.mmu.tlb.CORES), clock and latencies."""

    name: str
    tlb: str
    clock_hz: float
    clock_source: str
    latencies: dict[str, Latency] = field(default_factory=dict)

    def latency(self, term: str) -> float:
        found = self.latencies.get(term)
        if found is None or found.cycles is None:
            why = found.source if found else "no figure given"
            raise UsageError(f"core {self.name} has no latency for {term} ({why}); give one with --latency {term}=N")
        return found.cycles

    def override(self, **cycles: float) -> "Preset":
        """This preset with some latencies replaced (a user's own figures)."""
        unknown = sorted(set(cycles) - set(TERMS))
        if unknown:
            raise UsageError(f"unknown latency {unknown[0]!r}; known: {', '.join(TERMS)}")
        mine = {term: Latency(float(n), "given on the command line") for term, n in cycles.items()}
        return replace(self, latencies={**self.latencies, **mine})


PTI_RST = "Documentation/x86/pti.rst, Overhead 2a: moves to CR3 'on the order of a hundred cycles'"
CR3_NOFLUSH_SOURCE = (PTI_RST + "; no separate figure for a NOFLUSH write was found, so it is the same: what a "
                      "flushing write costs beyond it is the refill, which the model counts as walks")
HANSEN_INVPCID = ("Dave Hansen, LKML 2017 (INVPCID single-address flush about 350 cycles), as quoted in issue 22; "
                  "the message itself (lkml.kernel.org/r/3062e486-3539-8a1f-5724-16199420be71@intel.com) was not "
                  "retrievable here")
NOT_FOUND = "not found in the sources searched"

_INTEL_COMMON = {
    CR3_FLUSH: Latency(100, PTI_RST),
    CR3_NOFLUSH: Latency(100, CR3_NOFLUSH_SOURCE),
    INVPCID: Latency(350, HANSEN_INVPCID),
    INVLPG: Latency(None, NOT_FOUND + " (uops.info and Agner Fog's tables do not list it in the corpus)"),
}

SKYLAKE = Preset(
    "skylake", "skylake", 4.0e9, "Intel ARK: Core i7-6700K base frequency 4.0 GHz",
    {**_INTEL_COMMON,
     STLB_HIT: Latency(12, "no Skylake figure found; Haswell's measured L2 TLB hit, 12 cycles (news.mynavi.jp, "
                           "Haswell D-TLB measurements), taken for Skylake, whose STLB is the same design grown"),
     WALK_LOAD_L1: Latency(4, "Intel Optimization Reference Manual, Skylake client cache parameters: L1D fastest "
                              "latency 4 cycles"),
     WALK_LOAD_L2: Latency(12, "Intel Optimization Reference Manual, Skylake client cache parameters: L2 fastest "
                               "latency 12 cycles")},
)

HASWELL = Preset(
    "haswell", "haswell", 3.4e9, "Intel ARK: Core i7-4770 base frequency 3.4 GHz",
    {**_INTEL_COMMON,
     STLB_HIT: Latency(12, "news.mynavi.jp, Haswell D-TLB measurements: L2 TLB hit 12 cycles"),
     WALK_LOAD_L1: Latency(4, "Intel Optimization Reference Manual, Haswell: L1D 4 cycles (as Skylake's table)"),
     WALK_LOAD_L2: Latency(12, "Intel Optimization Reference Manual, Haswell: L2 about 12 cycles (as Skylake's)")},
)

ZEN2 = Preset(
    "zen2", "zen2", 3.6e9, "AMD: Ryzen 7 3700X base clock 3.6 GHz",
    {CR3_FLUSH: Latency(100, PTI_RST + " (written for Intel; no AMD figure found)"),
     CR3_NOFLUSH: Latency(100, CR3_NOFLUSH_SOURCE),
     INVPCID: Latency(350, HANSEN_INVPCID + " (measured on Intel; no AMD figure found)"),
     INVLPG: Latency(None, NOT_FOUND),
     STLB_HIT: Latency(12, NOT_FOUND + " for Zen 2; Haswell's measured 12 cycles taken"),
     WALK_LOAD_L1: Latency(4, "AMD Software Optimization Guide for Family 17h (56305): L1D load-to-use 4 cycles "
                              "(the guide as cited for ZEN2's TLBs; the page was not retrieved here)"),
     WALK_LOAD_L2: Latency(12, "AMD Software Optimization Guide for Family 17h (56305): L2 12 cycles (not "
                               "retrieved here)")},
)

GOLDMONT = Preset(
    "goldmont", "goldmont", 2.0e9, "Intel ARK: Atom C3958 (Denverton, Goldmont) base frequency 2.0 GHz",
    {**_INTEL_COMMON,
     STLB_HIT: Latency(12, NOT_FOUND + " for Goldmont; Haswell's measured 12 cycles taken"),
     WALK_LOAD_L1: Latency(4, NOT_FOUND + " for Goldmont; Skylake's 4 cycles taken"),
     WALK_LOAD_L2: Latency(12, NOT_FOUND + " for Goldmont (its L2 is a shared 1-2 MiB per two cores, wikichip, "
                               "likely slower); Skylake's 12 cycles taken")},
)



def _with_stlb_miss(preset: Preset) -> Preset:
    """A walk starts once the second level has missed: it pays that lookup
    first (the hit latency; no separate miss figure was found)."""
    hit = preset.latencies[STLB_HIT]
    miss = Latency(hit.cycles, "the second-level lookup a walk follows, as " + STLB_HIT + ": " + hit.source)
    return replace(preset, latencies={**preset.latencies, STLB_MISS: miss})


SKYLAKE, HASWELL, ZEN2, GOLDMONT = (_with_stlb_miss(p) for p in (SKYLAKE, HASWELL, ZEN2, GOLDMONT))
PRESETS = {p.name: p for p in (SKYLAKE, HASWELL, ZEN2, GOLDMONT)}


def get_preset(name: str) -> Preset:
    return one_of(PRESETS, name, "core")


def cycles(events: dict[str, float], preset: Preset) -> dict[str, float]:
    """Each term's cycles: its count times the preset's latency. A term with
    no events costs nothing whether or not the preset knows its latency."""
    unknown = sorted(set(events) - set(TERMS))
    if unknown:
        raise ValueError(f"unknown event {unknown[0]!r}")
    return {term: n * preset.latency(term) if n else 0.0 for term, n in events.items()}


def total(events: dict[str, float], preset: Preset) -> float:
    return sum(cycles(events, preset).values())
