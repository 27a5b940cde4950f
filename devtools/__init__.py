"""Developer tooling that may import every package: the tiny checkpoint writer."""
