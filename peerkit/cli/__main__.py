"""Allow `python -m peerkit.cli`."""

from .main import main

main()
