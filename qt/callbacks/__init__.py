"""Lightning callbacks that hook the training loop: the target networks (`targets`), evaluation
in the environment (`evaluation`, where training and acting meet) and MLflow artifacts
(`artifacts`). docs/training.md says which runs when.
"""
