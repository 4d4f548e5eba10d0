"""Offline test beds, built locally and deterministically: no weights or data sets come from a hub."""
