"""Helpers that run real infrastructure (containerd, reference flattening) for tests, benchmarks and the demo."""
