"""Every base-model family by name: the one place that knows them all. A new family is one module beside
`family_sd.py` and one entry here."""

from __future__ import annotations

from lorasmith.models.family import ModelFamily
from lorasmith.models.family_sd import SD1, SD2
from lorasmith.models.family_flux import Flux
from lorasmith.models.family_sdxl import SDXL

FAMILIES = ("sd1", "sd2", "sdxl", "flux")


def family_named(name: str) -> ModelFamily:
    return {"sd1": SD1, "sd2": SD2, "sdxl": SDXL, "flux": Flux}[name]()
