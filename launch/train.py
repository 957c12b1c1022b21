"""Entry point: ``deepspeed launch/train.py --deepspeed_config zero2 --config quickstart``.

The same script as ``deepspeed --module ds_contrastive.train`` (an installed
package needs no checkout). Configs are files or shipped names; any
training-config key can be overridden: ``--global_batch_size 4096 --lr 1e-4``.
``--help`` lists every key with its description and default.
"""

from ds_contrastive.run.train import main

if __name__ == "__main__":
    main()
