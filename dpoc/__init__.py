"""dpoc: compile a DPO recipe into a checked, runnable megatron-core / MindSpeed-RL job."""

__version__ = "0.1.0"
