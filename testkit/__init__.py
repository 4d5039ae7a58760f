"""Test tooling for peerlearn: the NAT lab, the local swarm of processes, hostile-frame
generators and the poisoning attacker. Used by the tests and the benchmarks of this checkout;
not part of the installed ``peerlearn`` wheel (``pyproject.toml`` lists only the product's
packages)."""
