"""Envoy bootstrap templates, shipped inside the package as ``controlplane._envoy``."""
