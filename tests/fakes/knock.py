"""Loopback fake (being written)."""
