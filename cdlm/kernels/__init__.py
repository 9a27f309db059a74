"""Fused GPU kernels (Triton). Each has a plain-torch reference elsewhere in cdlm that the tests
hold it to; nothing here is imported unless the fused path is selected."""
