"""The Hugging Face / sentence-transformers Trainer integration and the ``launch/train_hf.py`` script."""
