"""distil_ray: reinforcement learning from rich feedback (DistIL) on Ray."""

__version__ = "0.1.0"
