"""pyro-storn: STORN, a flow VAE and flow densities whose guides use the `transforms` flows."""

__version__ = "0.1.0"
