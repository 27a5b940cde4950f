"""Conformance against the reference's vectors: ``acestep-conformance VECTOR_DIR``.

Development tooling that may import every service package (the services never import it).
"""
