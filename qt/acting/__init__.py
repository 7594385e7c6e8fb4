"""Acting in environments: the Q-guided policy (`policy`) and batched evaluation episodes
(`episodes`). The Evaluation callback (`qt.callbacks.evaluation`) is where training and
acting meet.
"""
