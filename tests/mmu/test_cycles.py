"""The cycle model: cycles are the sum over events of count x latency, and every preset's latencies say where they come from."""

import pytest
from hypothesis import given, strategies as st

from ptilab.errors import UsageError
from ptilab.mmu import cycles as cy
from ptilab.mmu.overhead import Config, call_events

counts = st.fixed_dictionaries({t: st.integers(0, 10_000) for t in cy.TERMS if t != cy.INVLPG})


@given(counts, st.sampled_from(sorted(cy.PRESETS)))
def test_cycles_are_the_sum_of_count_times_latency(events, name):
    preset = cy.PRESETS[name]
    terms = cy.cycles(events, preset)
    assert terms.keys() == events.keys()
    for term, n in events.items():
        assert terms[term] == n * preset.latencies[term].cycles
    assert cy.total(events, preset) == sum(n * preset.latencies[t].cycles for t, n in events.items())


@given(st.sampled_from([c for c in (Config(False, True, None, None), Config(True, True, "entry", "linux"),
                                    Config(True, False, "none", "mirror"), Config(True, False, "text", "explicit"))]),
       st.integers(0, 24), st.sampled_from(sorted(cy.PRESETS)))
def test_a_played_call_is_priced_from_its_own_events(config, working_set, name):
    """The events of a real lseek loop, priced: doubling one term's latency adds exactly its count once more."""
    preset = cy.PRESETS[name]
    events = call_events(config, "kaiser-2017", preset.tlb, working_set)
    walks = events.pop("walks")
    assert events[cy.STLB_MISS] == walks
    assert events[cy.WALK_LOAD_L1] + events[cy.WALK_LOAD_L2] >= walks  # every walk loads one entry at least
    base = cy.total(events, preset)
    for term in (cy.CR3_FLUSH, cy.CR3_NOFLUSH, cy.WALK_LOAD_L1, cy.STLB_HIT):
        doubled = preset.override(**{term: 2 * preset.latency(term)})
        assert cy.total(events, doubled) == pytest.approx(base + events[term] * preset.latency(term))


def test_every_latency_names_its_source_and_unknown_ones_are_refused():
    for preset in cy.PRESETS.values():
        assert preset.clock_source
        for term in cy.TERMS:
            assert preset.latencies[term].source
    assert cy.PRESETS["skylake"].latencies[cy.INVLPG].cycles is None
    assert cy.total({cy.INVLPG: 0}, cy.SKYLAKE) == 0  # no event, no need for the figure
    with pytest.raises(UsageError, match="no latency for invlpg"):
        cy.total({cy.INVLPG: 1}, cy.SKYLAKE)
    assert cy.total({cy.INVLPG: 3}, cy.SKYLAKE.override(invlpg=10)) == 30
    with pytest.raises(UsageError, match="unknown latency"):
        cy.SKYLAKE.override(nosuch=1)
