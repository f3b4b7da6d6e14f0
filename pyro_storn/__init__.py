"""pyro-storn: STORN, a flow VAE and flow densities whose guides use the `transforms` flows."""

from .storn import STORN
from .vae import VAE

__all__ = ["STORN", "VAE"]

__version__ = "0.1.0"
