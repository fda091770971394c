"""Integrations with training libraries, each imported on its own (``import droppath_inject``
imports none of them, nor their libraries): ``droppath_inject.integrations.huggingface``."""
