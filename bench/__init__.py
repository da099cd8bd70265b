"""sdbridge benchmarks: scripts that measure side by side and print ratios (`python -m bench`)."""
