"""The training and evaluation stages, one module each, as `rlhf.steps` lists them; `rlhf.stages.dispatch` calls
one by name."""
