"""FPO: feature-level constrained preference optimisation (SPEC section 5): the offline reference cache and the method comparison."""
