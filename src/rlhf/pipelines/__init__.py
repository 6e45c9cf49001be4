"""The Kubeflow pipeline: the DAG (`rlhf_pipeline`) and how it runs (`run`: local runner, cluster submission)."""
