"""System.map and /proc/kallsyms text: kernel symbols to label ranges by."""

from __future__ import annotations

from pathlib import Path

from ptilab.errors import InputError


def read_symbols(path: str | Path) -> dict[str, int]:
    """name -> address from 'ffffffff81000000 T _text' lines; module symbols
    ('... [mod]') are kept, the first address of a repeated name wins.
    Debian's linux-image ships an 83-byte System.map stub: that is an error."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as err:
        raise InputError(f"cannot read symbols from {path}: {err.strerror}") from None
    symbols: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if len(parts) < 3:
            continue
        try:
            address = int(parts[0], 16)
        except ValueError:
            raise InputError(f"{path}:{number}: not a System.map/kallsyms line: {line[:60]!r}") from None
        symbols.setdefault(parts[2], address)
    if "_text" not in symbols:
        raise InputError(f"{path} holds no _text symbol: not a System.map or /proc/kallsyms "
                         f"(Debian's linux-image ships only a stub; read the guest's /proc/kallsyms as root)")
    return symbols
