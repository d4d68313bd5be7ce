"""The processes a run spans and the libraries under it: accelerate, DeepSpeed, the hub, files."""
