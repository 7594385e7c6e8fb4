"""Packed fits: many QT fits trained as one batched computation (see CONTRACT.md)."""
