"""The training loop shared by every method, and what runs around it."""
