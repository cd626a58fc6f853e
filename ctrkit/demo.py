"""Placeholder demo; replaced by the layers work."""
