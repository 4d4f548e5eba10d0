"""MAP: amortized Pareto fronts with quadratic surrogates (arXiv 2406.07529). Being written."""
