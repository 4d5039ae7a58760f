"""Transports between peers: ZeroMQ for reachable peers (WebRTC follows)."""
