"""Degradation metrics: paired, step-to-step and distribution metrics; feature extractors."""
