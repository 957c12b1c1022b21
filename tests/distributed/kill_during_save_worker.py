"""Worker for tests/test_resume.py: ``launch/train.py`` whose rank 0 is SIGKILLed in the middle of a save.

Rank 0 kills itself right after DeepSpeed has written the checkpoint named
by ``KILL_DURING_SAVE_OF`` (its model and optimizer files are on disk) and
before ds_contrastive commits it: the state a crash, an OOM kill or a
preemption leaves mid-save.
"""

import os
import signal

from deepspeed.runtime.engine import DeepSpeedEngine

from ds_contrastive.core.runtime import world
from ds_contrastive.run.train import main

target = os.environ["KILL_DURING_SAVE_OF"]
save_checkpoint = DeepSpeedEngine.save_checkpoint


def save_then_die(self, save_dir, tag=None, **kwargs):
    save_checkpoint(self, save_dir, tag=tag, **kwargs)
    if str(tag).startswith(target) and world()[0] == 0:
        os.kill(os.getpid(), signal.SIGKILL)


DeepSpeedEngine.save_checkpoint = save_then_die

if __name__ == "__main__":
    main()
