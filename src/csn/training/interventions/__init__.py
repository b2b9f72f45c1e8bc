"""Interventions on a training run as plug-ins (the protocol: csn.training.interventions.base).

The registry finds this package's modules by itself (csn.registry), so an intervention registers itself by being in
the package: a new kind is its module and its test, nothing else.
"""

from __future__ import annotations

from csn.training.interventions.base import (
    INTERVENTIONS,
    LOG_DEFAULTS,
    Context,
    Intervention,
    build_interventions,
    parse_interventions,
    register,
)

__all__ = ["Context", "Intervention", "INTERVENTIONS", "LOG_DEFAULTS", "register", "parse_interventions",
           "build_interventions"]
