"""Distributed hard-negative mining (``ds-contrastive mine``): read, embed, search, select, write.

The steps in order are :func:`~ds_contrastive.mining.miner.mine`; the search
(:mod:`.search`) and the selection rules (:mod:`.rules`) are pure functions
of tensors; :mod:`.embed`, :mod:`.inputs`, :mod:`.output` and :mod:`.report`
hold the rest; :mod:`.cli` the command line.
"""
