"""Interventions on a training run as plug-ins (the protocol: csn.training.interventions.base).

Every module of this package is imported here, so an intervention registers itself by being in the package: a new
kind is its module and its test, nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from csn.training.interventions.base import (
    INTERVENTIONS,
    LOG_DEFAULTS,
    Context,
    Intervention,
    build_interventions,
    parse_interventions,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Context", "Intervention", "INTERVENTIONS", "LOG_DEFAULTS", "register", "parse_interventions",
           "build_interventions"]
