"""Guides, one module per family, swapped by name through the registry."""
