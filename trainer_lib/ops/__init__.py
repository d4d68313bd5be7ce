"""Compute kernels the stack lacks: the chunked cross-entropy and per-document attention."""
