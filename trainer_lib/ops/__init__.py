"""What the loss computes beside the model: the chunked cross-entropy with the model's own head,
a mixture-of-experts model's load-balancing loss, and per-document attention."""
