"""Small helpers shared by every package: distributed communication, registries, logging."""
