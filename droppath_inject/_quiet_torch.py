"""Import torch without the two-line warning it prints when numpy is not installed.

The core needs only torch and never uses numpy, and the command line promises one line on
stderr per error; the package imports this module before anything else imports torch.
"""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401
