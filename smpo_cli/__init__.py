"""smpo: align text-to-image diffusion models with SmPO-Diffusion, Diffusion-DPO and SFT.

This module imports nothing heavy so that ``smpo --help`` stays instant.
"""

__version__ = "0.1.0.dev0"
