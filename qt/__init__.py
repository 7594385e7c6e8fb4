"""qt: the Q-value Regularized Transformer (Hu et al., ICML 2024) for offline RL."""

__version__ = "0.1.0"
