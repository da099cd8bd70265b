"""sdbridge benchmarks: scripts that measure side by side and print ratios (`python -m bench`)."""

import os

# Before torch loads in any bench process: OpenMP threads left spinning after this process's
# direct runs took the cores from the daemon beside it (2.1-2.2x slower on 2 cores with 2
# threads), which measured the harness, not the daemon. The daemon waits passively too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
