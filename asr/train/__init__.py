"""Training: corpora to manifests, the dataset and batch sampler, the trainer, several processes (DDP)."""
