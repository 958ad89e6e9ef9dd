"""Layer 5: command-line tools (alltoall-info, alltoall-bench)."""
