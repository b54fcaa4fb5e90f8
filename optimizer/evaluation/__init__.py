"""Measuring a variant: quality against the baseline, timing, the reference to beat, and the Evaluation record."""
