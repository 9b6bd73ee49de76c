"""NeMo-Run experiment definitions."""
