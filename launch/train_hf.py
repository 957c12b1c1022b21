"""sentence-transformers' Trainer with ds_contrastive's exact cached step.

    deepspeed --num_gpus 8 launch/train_hf.py --deepspeed configs/deepspeed/hf_zero3.json \
        --per_device_train_batch_size 4096 --learning_rate 5e-5 --output_dir outputs/run1

Also under ``torchrun`` (DDP without ``--deepspeed``) and ``accelerate launch``.
``--help`` lists every option: the Trainer's and ds_contrastive's (model, data, loss, chunking).
"""

from ds_contrastive.hf.train_hf import main

if __name__ == "__main__":
    main()
