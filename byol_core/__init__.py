"""BYOL (Bootstrap Your Own Latent) and the ablations of the 2020 study, in plain PyTorch.

Importing the package stays light: ``byol_core.spec`` and ``byol_core.presets`` need only
pydantic, so the service can validate job specs without torch.
"""

__version__ = "0.1.0"
