"""Detectors, their building blocks, matcher and losses."""
