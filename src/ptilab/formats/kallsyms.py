"""System.map and /proc/kallsyms text: kernel symbols to label ranges by."""

from __future__ import annotations

from pathlib import Path
from typing import Collection

from ptilab.errors import InputError
from ptilab.formats.textfile import read_lines

# The names ptilab's analyses look up: the entry text's bounds (audit), _text
# (the KASLR slide's anchor) and the IDT's first handler (meltdown).
USED = frozenset({"_text", "__entry_text_start", "__entry_text_end", "asm_exc_divide_error"})
MAX_SYMBOLS = 1 << 19  # 512 Ki names kept (~90 MB); Debian 6.1's kallsyms has 94 000


def read_symbols(path: str | Path, names: Collection[str] | None = None) -> dict[str, int]:
    """name -> address from 'ffffffff81000000 T _text' lines, read a line at
    a time; module symbols ('... [mod]') are kept, the first address of a
    repeated name wins. names: keep only these (memory bounded by them, not
    by the file); else every name, at most MAX_SYMBOLS.
    Debian's linux-image ships an 83-byte System.map stub: that is an error."""
    symbols: dict[str, int] = {}
    for number, line in read_lines(path, "System.map/kallsyms text"):
        parts = line.split()
        if len(parts) < 3:
            continue
        try:
            address = int(parts[0], 16)
        except ValueError:
            raise InputError(f"{path}:{number}: not a System.map/kallsyms line: {line[:60]!r}") from None
        if names is None or parts[2] in names:
            symbols.setdefault(parts[2], address)
            if len(symbols) > MAX_SYMBOLS:
                raise InputError(f"{path}:{number}: more than {MAX_SYMBOLS} symbols: "
                                 f"larger than any kernel's System.map")
    if "_text" not in symbols:
        raise InputError(f"{path} holds no _text symbol: not a System.map or /proc/kallsyms "
                         f"(Debian's linux-image ships only a stub; read the guest's /proc/kallsyms as root)")
    return symbols
