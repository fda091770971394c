"""Sweeps of whole model libraries against their own drop-path placement (see ``timm_families``)."""
