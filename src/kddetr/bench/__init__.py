"""Benchmarks behind `kddetr bench` (thin wrappers live in benchmarks/)."""
