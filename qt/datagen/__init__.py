"""Making offline datasets by the D4RL protocol: behaviour policies (the Maze2D waypoint
controller, stable-baselines3 SAC for locomotion), their rollouts, and the writers that store
the result as a Minari dataset and a D4RL hdf5 file. `python -m qt.datagen NAME` is the
command; training reads what it writes through `qt.data`.
"""
