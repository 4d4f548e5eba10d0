"""Scorers: objectives from the job spec that score a live model per example (filled by the scoring work)."""
