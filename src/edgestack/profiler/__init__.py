"""Latency, memory and quality measurement (used by the demo and ``edgestack bench``)."""
