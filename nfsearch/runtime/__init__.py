"""GPU runtime: SM partitions, SM-bounded kernels and torch references."""
