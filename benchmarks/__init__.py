"""Reproducible performance figures: rulebound beside its peers (see run.py)."""
