"""Examples of bringing your own data and model to peerlearn (see docs/own-data.md)."""
