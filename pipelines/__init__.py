"""The Kubeflow DAG (filled by the Kubeflow issue)."""
