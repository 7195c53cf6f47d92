"""DiDAE: gradient-free counterfactuals with a diffusion autoencoder and an embedding dictionary."""
