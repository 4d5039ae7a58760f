"""Transports between peers: ZeroMQ for reachable peers, WebRTC data channels for the rest."""
