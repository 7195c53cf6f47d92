"""Small utilities: image grids, result tables."""
