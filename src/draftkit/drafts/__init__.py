"""Draft model builders. Each takes plain arguments (never a config object) and returns an nn.Module."""
