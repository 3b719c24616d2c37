"""Audit a kernel's page tables against PTI's promises."""

from ptilab.audit.checks import Views, audit, classify
from ptilab.audit.findings import Finding, Severity, Span

__all__ = ["Finding", "Severity", "Span", "Views", "audit", "classify"]
