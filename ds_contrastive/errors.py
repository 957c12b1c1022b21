"""Every exception a user of ds_contrastive may catch, in one place.

Each names the problem in its message. The ones raised "on every rank alike"
are agreed through a collective first, so that no rank is left waiting in the
next one.
"""


class BatchError(ValueError):
    """A batch that cannot be trained on; raised on every rank alike."""


class DataError(ValueError):
    """Bad training data or a bad data config; the message names the file and the problem."""


class ConfigError(ValueError):
    """A configuration that ds_contrastive refuses to run, with the reason."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from; raised on every rank alike.

    (A failure inside DeepSpeed's own reading or writing is raised on the rank
    where it happens; the others stop with a RankFailure at their next
    collective, within the collective timeout.)
    """


class OutputDirError(RuntimeError):
    """An output_dir that holds another run, which a new run would overwrite; raised on every rank alike."""


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps had a non-finite loss; raised on every rank alike."""


class RankFailure(RuntimeError):
    """A collective failed: another rank died, or did not answer within the collective timeout."""


class ReportError(ValueError):
    """A run directory or file that cannot be read; the message names the path."""
