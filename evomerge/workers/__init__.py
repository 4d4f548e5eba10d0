"""Ray actor pool and the inline executor: evaluators that merge in place and score."""
