"""Edges of the listener: where instances are stored and where their events are published."""
