"""`python -m training` from a clone: an alias of `python -m cdlm.training` (not installed).

The pipeline lives in `cdlm.training`, so an installed cdlm never adds a top-level package named
`training` to a user's environment (docs/ARCHITECTURE.md, "Package layout").
"""
