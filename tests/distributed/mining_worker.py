"""Mining on every rank of a real job: good runs write their outputs, bad inputs record each rank's error."""

import json
from pathlib import Path

from helpers import worker_main

from ds_contrastive.core.collectives import all_gather_objects
from ds_contrastive.errors import ConfigError, DataError
from ds_contrastive.mining.miner import MiningOptions, mine
from ds_contrastive.mining.rules import SelectionRules


def build(args) -> dict:
    """``--runs``: a JSON object of name -> MiningOptions fields (``rules`` as a dict); each rank's error or None."""
    errors = {}
    for name, fields in json.loads(Path(args.runs).read_text()).items():
        fields = {**fields, "rules": SelectionRules(**fields.get("rules", {}))}
        try:
            mine(MiningOptions(model=args.model, progress=False, **fields))
            errors[name] = None
        except (DataError, ConfigError) as e:
            errors[name] = f"{type(e).__name__}: {e}"
    return {"errors": all_gather_objects(errors)}


if __name__ == "__main__":
    worker_main(build, {"--runs": {"required": True}})
