"""DiCap: causality-aligned prompt learning with diffusion counterfactuals (METHODS.md §1)."""
