"""Shared test settings."""

from hypothesis import settings

# Torch's first call of an op can take far longer than hypothesis' default 200 ms deadline.
settings.register_profile("droppath", deadline=None)
settings.load_profile("droppath")
