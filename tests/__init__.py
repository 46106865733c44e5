"""The test suite (a regular package, so that a top-level `tests` package some wheels install into site-packages,
such as latex2sympy2, a dependency of lmms-eval, cannot shadow it)."""
