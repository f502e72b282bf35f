"""Allow `python -m peerkit.cli` (through the agent when PEERKIT_AGENT is set)."""

from .launch import main

main()
