"""Integrations with training libraries, each imported on its own (``import droppath_inject``
imports none of them, nor their libraries): ``droppath_inject.integrations.huggingface`` for the
``transformers.Trainer``, ``droppath_inject.integrations.lightning`` for PyTorch Lightning."""
