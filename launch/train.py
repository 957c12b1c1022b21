"""Entry point: ``deepspeed launch/train.py --deepspeed_config configs/deepspeed/zero2.json --config configs/train/quickstart.yaml``.

Any training-config key can be overridden: ``--global_batch_size 4096 --lr 1e-4``.
``--help`` lists every key with its default.
"""

from ds_contrastive.run.train import main

if __name__ == "__main__":
    main()
