"""Models: loading by alias, sites, and per-architecture adapters that read/write weights as (out, in)."""

from spectra.models.adapters import Adapter, adapter_for
from spectra.models.loading import ALIASES, LoadedModel, load_model, locally_available
from spectra.models.sites import SITE_KINDS, Site, parse_sites

__all__ = [
    "ALIASES", "SITE_KINDS", "Adapter", "LoadedModel", "Site", "adapter_for", "load_model",
    "locally_available", "parse_sites",
]
