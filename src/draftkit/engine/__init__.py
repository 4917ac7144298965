"""What every recipe shares: the one training loop, checkpoints, metric sinks and run directories."""
