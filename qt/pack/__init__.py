"""Packed fits: a study's seeds and variants trained in one process as one computation.

- `qt.pack.loop.LoopPackedQTModule`: the packed module's contract as a loop over ordinary
  `QTModule`s (the reference);
- `qt.pack.data`, `qt.pack.callbacks`, `qt.pack.logger`: the stacked data streams, each
  member's callbacks and its MLflow run;
- `qt.pack.fit.fit_pack`: N `cli.py fit` configurations as one Lightning fit.
"""
