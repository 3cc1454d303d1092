"""Training: ray sampling, volume rendering, losses, the optimisation step, the worker thread and its
lock, recovery and convergence."""
