"""PTI's cost per system call, held against Dave Hansen's lseek1 measurements (LKML, 2017-11-01).

The model is built from cited latencies and never fitted to his table; the
only figure it takes from it is the PTI-off rate (the base of a call). Where
it misses his ratios by more than 15 % these tests assert the miss, and
which term it comes from (README, "What PTI costs a system call").
"""

import json

import pytest

from ptilab.cli import main
from ptilab.mmu import cycles as cy
from ptilab.mmu import overhead as oh
from ptilab.pti import DESIGNS

BOUND = 0.15


@pytest.fixture
def run_cli(capsys):
    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as done:
            main(list(args))
        out, err = capsys.readouterr()
        return done.value.code, out, err
    return run


@pytest.fixture(scope="module")
def skylake():
    return oh.overhead(None, "kaiser-2017", "skylake")


@pytest.fixture(scope="module")
def hansen(skylake):
    return oh.hansen_rows(skylake)


def test_the_pti_off_base_is_hansens_rate_and_nothing_else_is_taken_from_his_table(skylake):
    off = [c for c in skylake if not c.config.pti]
    assert [c.calls_per_second for c in off] == pytest.approx([oh.BASELINE_CALLS_PER_S] * 2)
    assert all(c.terms == {t: 0.0 for t in c.terms} for c in off)  # the loop fits the TLB: no modelled cost


def test_the_order_is_hansens_but_global_entry_pieces_buy_nothing_with_pcid(hansen):
    measured = [m for _, m, _ in hansen]
    model = [r for _, _, r in hansen]
    order = sorted(range(5), key=lambda i: -measured[i])
    ranked = [model[i] for i in order]
    assert ranked == sorted(ranked, reverse=True)  # never out of Hansen's order ...
    pcid_none, pcid_entry = model[1], model[2]
    assert pcid_none == pcid_entry  # ... but tied where he measured 3.0 M against 3.1 M:
    # with PCID nothing is flushed, so a global TLB entry outlives nothing a non-global one would not.
    assert model[3] < model[4] < model[1]  # without PCID global entry pieces help, and PCID helps more


def test_the_model_underestimates_what_pti_cost_hansen_by_more_than_the_bound(hansen):
    """A finding, not a fudge: every PTI ratio is above Hansen's by more than 15 %."""
    for label, measured, model in hansen[1:]:
        assert model / measured - 1 > BOUND, label


def test_with_pcid_the_whole_modelled_overhead_is_the_two_cr3_writes(skylake):
    """So the PCID miss is that term: Hansen's rate needs each write to cost far more than pti.rst's hundred."""
    row = next(c for c in skylake if c.config == oh.Config(True, True, "none", "explicit"))
    nonzero = {t: v for t, v in row.terms.items() if v}
    assert nonzero == {cy.CR3_NOFLUSH: 2 * 100.0}
    hansen_cycles = cy.SKYLAKE.clock_hz / 3.0e6 - row.base_cycles
    assert hansen_cycles / 2 > 2.5 * cy.SKYLAKE.latency(cy.CR3_NOFLUSH)  # ~280 cycles a write at 4.0 GHz


def test_without_pcid_global_entry_pieces_save_walks_but_fewer_cycles_than_hansen_measured(skylake):
    """The walk term is the one off without PCID: the model's walks hit L1 (its data cache holds only
    page-table lines), so seven fewer walks save about 136 cycles where Hansen's rates differ by ~218."""
    by = {c.config: c for c in skylake}
    none, entry = by[oh.Config(True, False, "none", "explicit")], by[oh.Config(True, False, "entry", "explicit")]
    assert none.tlb_misses > entry.tlb_misses > by[oh.Config(True, False, "text", "explicit")].tlb_misses
    saved_model = none.cycles_per_call - entry.cycles_per_call
    saved_hansen = cy.SKYLAKE.clock_hz * (1 / 2.2e6 - 1 / 2.5e6)
    assert 0 < saved_model < saved_hansen
    assert none.events[cy.WALK_LOAD_L2] == 0  # every walk load an L1 hit: the optimistic case


def test_designs_differ_in_no_cycle_per_call_and_in_a_few_per_cold_refill():
    """The seed's 'wee bit faster': the steady-state call is the same for every design; a cold refill
    is cheaper by the L2-minus-L1 cost of each line the shared tables let both views use."""
    for core in cy.PRESETS:
        rows = {d: (call, refill) for d, call, refill in oh.design_differences(core)}
        assert set(rows) == set(DESIGNS)
        assert len({call for call, _ in rows.values()}) == 1
        assert rows["linux"][1] < rows["shared-pmd"][1] < rows["explicit"][1]


def test_without_pcid_a_large_working_set_is_refilled_every_call():
    configs = [oh.Config(False, False, None, None), oh.Config(True, True, "entry", "linux"),
               oh.Config(True, False, "entry", "linux")]
    sweep = oh.working_set_sweep([0, 32], configs)
    by = {(c.working_set, c.config): c for c in sweep}
    for n in (0, 32):
        assert by[(n, configs[1])].tlb_misses == 0  # PCID keeps the user's entries across both CR3 writes
    assert by[(32, configs[2])].tlb_misses - by[(0, configs[2])].tlb_misses == 32
    assert by[(32, configs[2])].throughput_ratio < by[(0, configs[2])].throughput_ratio


@pytest.mark.parametrize("core", sorted(cy.PRESETS))
def test_overhead_runs_on_every_preset_with_one_json_row_per_configuration(run_cli, core):
    code, out, err = run_cli("overhead", "--core", core, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 2 + 2 * len(oh.GLOBALS) * len(DESIGNS)
    keys = {"pti", "pcid", "global", "design", "cycles_per_call", "calls_per_second", "throughput_ratio"}
    assert all(keys <= row.keys() for row in rows)
    assert {(r["pti"], r["pcid"], r["global"], r["design"]) for r in rows} == {
        (c.pti, c.pcid, c.global_, c.design) for c in oh.configurations()}
    for r in rows:
        if not r["pti"]:
            assert r["throughput_ratio"] == 1


@pytest.mark.parametrize("args, message", [
    (("--working-set", "x"), "--working-set must be numbers"),
    (("--working-set", "99999"), "--working-set must be 0 to"),
    (("--global", "all"), "--global takes none, entry or text"),
    (("--latency", "cr3_flush"), "--latency takes TERM=CYCLES"),
    (("--latency", "nosuch=3"), "unknown latency"),
    (("--core", "pentium"), "unknown core"),
])
def test_bad_overhead_input_is_one_line(run_cli, args, message):
    code, out, err = run_cli("overhead", *args)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_cost_over_several_nr_cpus_says_once_that_nothing_changed(run_cli):
    code, out, err = run_cli("cost", "--cpus", "1,4,16", "--workload", "syscall", "--design", "linux,off")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.split()[:1] in (["1"], ["4"], ["16"])]
    assert [r.split()[1] for r in rows] == ["linux", "off"]  # one block, not three
    assert "NR_CPUS 1, 4, 16: identical counts for every design and workload, shown once" in out
    code, out, _ = run_cli("cost", "--cpus", "1,4", "--workload", "syscall", "--design", "linux", "--json")
    assert len(json.loads(out)) == 2  # the JSON keeps every row
