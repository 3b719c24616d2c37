"""PTI designs: each builds the user half of the PGD pair its own way."""

from ptilab.errors import UsageError
from ptilab.pti.design import Design
from ptilab.pti.explicit import ExplicitDesign
from ptilab.pti.linux import LinuxDesign
from ptilab.pti.mirror import MirrorDesign
from ptilab.pti.shared_pmd import SharedPmdDesign

DESIGNS: dict[str, type[Design]] = {d.name: d for d in (ExplicitDesign, MirrorDesign, SharedPmdDesign, LinuxDesign)}


def get_design(name: str) -> Design:
    try:
        return DESIGNS[name]()
    except KeyError:
        raise UsageError(f"unknown design {name!r}; choose one of: {', '.join(DESIGNS)}") from None


__all__ = ["DESIGNS", "Design", "get_design"]
