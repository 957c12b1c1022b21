"""``python -m ds_contrastive.mining``, ``deepspeed --module ds_contrastive.mining``, ``torchrun -m
ds_contrastive.mining``: ``ds-contrastive mine`` under any launcher."""

from .cli import main

if __name__ == "__main__":
    main()
