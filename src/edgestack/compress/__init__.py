"""Torch compression passes and compressed layers (imports torch)."""
