"""Kubeflow Pipelines components: `definitions` (one typed component per step) and `steps` (what they run)."""
