"""Search spaces (genome -> recipe), ask/tell optimizers and Pareto utilities. Pure numpy: never imports torch."""
