"""PTI designs: each builds the user half of the PGD pair its own way."""

from ptilab.errors import UsageError
from ptilab.linux.kernel import Kernel
from ptilab.linux.profiles import Profile, get_profile
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


def boot(profile: str | Profile = "linux-6.1", design: str | Design = "linux", cpus: int = 4,
         levels: int = 4, kaslr: bool = True, seed: int = 0) -> Kernel:
    """Boot a modelled kernel with a PTI design; the public entry point.

    kaslr and seed matter only to a profile with random cpu_entry_area slots
    (linux-6.12): the model randomises those slots, nothing else.

    >>> k = boot("linux-6.1", "shared-pmd", cpus=2)
    >>> k.user_cr3()
    """
    if isinstance(profile, str):
        profile = get_profile(profile)
    if isinstance(design, str):
        design = get_design(design)
    return Kernel(profile, design, cpus, levels, kaslr, seed).boot()


__all__ = ["DESIGNS", "Design", "boot", "get_design"]
