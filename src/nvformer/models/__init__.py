"""Models built on the NV layers: :class:`NVAE` (Transformer VAE with an NVIB latent) and its baselines."""

from .nvae import NVAE, NVAEConfig, NVAEOutput, anneal

__all__ = ["NVAE", "NVAEConfig", "NVAEOutput", "anneal"]
