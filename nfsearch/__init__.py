"""nfsearch: find and run NanoFlow-style intra-GPU overlap schedules for LLM serving."""

__version__ = "0.1.0"
