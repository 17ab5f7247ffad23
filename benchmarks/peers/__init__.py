"""Peer workloads: the same five-step workflow written the way each peer's docs recommend."""
