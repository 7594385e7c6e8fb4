"""Packed fits: many QT fits trained as one batched computation (see CONTRACT.md).

- `qt.pack.module.PackedQTModule`: the batched module (stacked parameters, one step for all);
- `qt.pack.loop.LoopPackedQTModule`: the same contract as a loop over ordinary `QTModule`s
  (the reference the batched module is tested against);
- `qt.pack.data`, `qt.pack.callbacks`, `qt.pack.logger`: the stacked data streams, each
  member's callbacks and its MLflow run;
- `qt.pack.fit.fit_pack`: N `qt fit` configurations as one Lightning fit.
"""
