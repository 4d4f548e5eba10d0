"""M2N2: natural-niche model fusion (arXiv 2508.16204). Being written."""
