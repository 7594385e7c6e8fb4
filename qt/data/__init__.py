"""Serving datasets to training: readers (D4RL hdf5, Minari, the d4rl package), the flat
trajectory store, the vectorised segment sampler and the Lightning data module.
"""
