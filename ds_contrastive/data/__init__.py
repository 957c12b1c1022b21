"""Where global batches come from: data files, mixtures of datasets, streaming, the built-in stdlib pairs."""
