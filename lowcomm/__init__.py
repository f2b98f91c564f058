"""lowcomm: low-communication decentralized training (DiLoCo, Streaming DiLoCo)."""
