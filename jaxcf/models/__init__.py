"""Flax model definitions (CLIP, UNets, VAE, DiffAE UNet) and their checkpoint loaders."""
