"""The configs shipped with the package: DeepSpeed JSON in ``deepspeed/``, training YAML in ``train/``.

Every option that takes a config file also takes one of these names
(``--deepspeed_config zero3``, ``--config quickstart``), so that a package
installed without a checkout trains as the README shows. In a checkout,
``configs/`` at the top links here.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

HERE = Path(__file__).resolve().parent
SUFFIX = {"deepspeed": ".json", "train": ".yaml"}


def shipped_names(kind: str) -> list[str]:
    """The names of the shipped configs of ``kind`` ('deepspeed' or 'train')."""
    return sorted(path.stem for path in (HERE / kind).glob(f"*{SUFFIX[kind]}"))


def config_file(value: str | Path, kind: str, what: str) -> Path:
    """``value`` as a file (a relative path read from the working directory), else the shipped config of that name.

    ``what`` names the option in the error, which lists the shipped names.
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    shipped = HERE / kind / f"{value}{SUFFIX[kind]}"
    if str(value) in shipped_names(kind):
        return shipped
    where = f" (relative paths are read from {Path.cwd()})" if not path.is_absolute() else ""
    raise ConfigError(f"{what} {value} does not exist{where}; give a file, or the name of a shipped one: "
                      f"{', '.join(shipped_names(kind))}")
