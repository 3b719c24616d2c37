"""The README's tour shows real output: every `$ ptilab ...` in its console
blocks is run, and every line shown under it must be in what ptilab prints
(whitespace aside; "..." marks what the README leaves out). On the real
kernel fixtures, whose addresses and sizes change from build to build,
hexadecimal numbers and MiB counts only have to be there, not be equal."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ptilab.cli import main
from tests.realkernel.conftest import real_kernel

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = re.compile(r"tests/realkernel/out/([\w-]+)/")


def _tour() -> list[tuple[str, list[str]]]:
    """(command, the output lines the README shows for it), in README order."""
    text = (ROOT / "README.md").read_text()
    found: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                found.append((line[2:], []))
            elif found:
                found[-1][1].append(line)
    return [(cmd, shown) for cmd, shown in found if cmd.startswith("ptilab ")]


TOUR = _tour()


def _words(text: str) -> str:
    return " ".join(text.split())


def _pattern(fragment: str, volatile: bool) -> re.Pattern:
    pattern = re.escape(_words(fragment))
    if volatile:
        pattern = re.sub(r"0x[0-9a-f]+", r"0x[0-9a-f]+", pattern)
        pattern = re.sub(r"\d+\\ MiB", r"\\d+\\ MiB", pattern)
    return re.compile(pattern)


def test_the_tour_has_commands_to_check():
    assert len(TOUR) >= 7, TOUR


@pytest.mark.parametrize("command, shown", TOUR, ids=[c for c, _ in TOUR])
def test_tour_output_is_what_ptilab_prints(command, shown, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = shlex.split(command.split(";")[0])[1:]
    fixtures = FIXTURE.findall(command)
    for config in fixtures:
        real_kernel(config)  # built on demand, skipped or failed as the fixture tests are
    with pytest.raises(SystemExit) as done:
        main(args)
    out, err = capsys.readouterr()
    want_exit = next((int(line.split()[1]) for line in shown if re.fullmatch(r"exit \d+", line)), 0)
    assert done.value.code == want_exit, err
    printed = _words(out)
    for line in shown:
        if re.fullmatch(r"exit \d+", line):
            continue
        for fragment in line.split("..."):
            if _words(fragment):
                assert _pattern(fragment, bool(fixtures)).search(printed), f"README shows {fragment.strip()!r}"


def test_the_docs_link_nothing_outside_the_repository():
    """A clone has README.md and docs/, not what sat beside the repository when it was written."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        assert "../shared" not in text and "/work/" not in text, path
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.name} links {target}, which is not in the repository"
