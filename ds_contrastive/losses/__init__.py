"""Contrastive losses on gathered embeddings: InfoNCE, guided (GIST-style) with its guide model, Matryoshka."""
