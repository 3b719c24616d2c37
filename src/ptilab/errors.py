"""ptilab's own exceptions: each carries a one-line message and an exit code,
so the CLI can print one line and leave with that code instead of a traceback."""


class PtilabError(Exception):
    """Base of every error ptilab raises on purpose."""

    exit_code = 2


class UsageError(PtilabError):
    """A choice the user made is not one of the valid ones (design, profile, range)."""


class InputError(PtilabError):
    """A file or value the user handed in is missing, unreadable or malformed."""


class FrameOutsideMemory(InputError):
    """A physical frame was asked for that the memory source does not hold."""

    def __init__(self, pa: int):
        super().__init__(f"physical address {pa:#x} is outside the memory image")
        self.pa = pa


class WalkTooLarge(PtilabError):
    """The tables alias so much that expanding them would not finish in bounded time."""


def one_of(table: dict, name: str, what: str):
    """table[name], or a UsageError naming what was asked for and every choice."""
    try:
        return table[name]
    except KeyError:
        raise UsageError(f"unknown {what} {name!r}; choose one of: {', '.join(table)}") from None
