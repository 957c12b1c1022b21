"""The step: cached-gradient chunks, the cross-rank exchange, and what wraps the model.

Read :mod:`~ds_contrastive.core.step` first: :class:`~ds_contrastive.core.step.CachedStep` is the
algorithm, numbered as in the README's design section."""
