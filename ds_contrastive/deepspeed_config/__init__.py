"""A DeepSpeed config for the contrastive step: reading it, resolving its "auto" values, checking it."""
