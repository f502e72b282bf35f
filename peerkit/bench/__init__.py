"""peerkit's benchmark harness: ``python -m peerkit.bench`` (or ``bin/peerkit-bench``).

Not part of the runtime: nothing in peerkit imports this package.  It needs
root and a checkout (it reuses the integration tests' fixture code in
``tests/support/sshd.py``).
"""
