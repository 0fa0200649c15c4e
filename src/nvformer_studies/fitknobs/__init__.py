"""Knobs fitted by gradient against the alternatives (issue 18)."""
