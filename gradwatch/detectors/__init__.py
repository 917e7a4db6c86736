"""Detectors: one family of checks each, sharing the lifecycle in :mod:`.base`."""
