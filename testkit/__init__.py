"""Test tooling for peerlearn: the NAT lab (``testkit.natlab``), the local swarm of processes
(``testkit.swarm``), shared fixtures (``testkit.fixtures``), hostile-frame generators
(``testkit.hostile``) and the poisoning attacker (``testkit.attacker``). Used by the tests and
the benchmarks of this checkout, run from its root; not part of the installed ``peerlearn``
wheel (``pyproject.toml`` lists only the product's packages)."""
