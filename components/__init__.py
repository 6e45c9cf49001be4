"""Kubeflow Pipelines components: thin typed wrappers over the stage functions (filled by the Kubeflow issue)."""
