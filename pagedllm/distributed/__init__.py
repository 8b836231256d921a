"""Process groups and collectives for tensor (and pipeline) parallelism over torch.distributed."""
