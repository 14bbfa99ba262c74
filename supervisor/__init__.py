"""The supervisor: registry, health, metrics, signals and the workers' lifecycle."""
