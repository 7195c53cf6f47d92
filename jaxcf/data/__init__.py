"""Datasets: Square, the shapes world, tfds datasets and image folders."""
