"""peerkit: pair self-hosted servers over SSH and move app data between them."""

__version__ = "0.1.0"
