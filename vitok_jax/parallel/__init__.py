"""Mesh construction and sharding helpers."""
