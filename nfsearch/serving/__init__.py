"""The engine's host side, torch-free: traces, pages, the scheduler, metrics, model configs."""
