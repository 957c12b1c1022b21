"""A mistake the user can fix ends with one ``error:`` line and its documented exit code; a bug keeps its traceback."""

import pytest

from ds_contrastive.errors import CheckpointError, ConfigError, DataError, OutputDirError
from ds_contrastive.run.console import EXIT_CODES, clean_errors


@pytest.mark.parametrize("error,code", [(ConfigError("bad key"), 2), (DataError("no column"), 3),
                                        (OutputDirError("holds a run"), 4), (CheckpointError("differs"), 4)])
def test_a_user_error_is_one_line_and_its_code(error, code, capsys, monkeypatch):
    monkeypatch.delenv("DS_CONTRASTIVE_DEBUG", raising=False)
    monkeypatch.setenv("RANK", "0")
    # exiting closes the process group; this test process keeps its one-rank group for the tests after it
    monkeypatch.setattr("ds_contrastive.run.console._leave_process_group", lambda: None)
    with pytest.raises(SystemExit) as exited:
        with clean_errors():
            raise error
    assert exited.value.code == code == EXIT_CODES[type(error)]
    assert capsys.readouterr().err == f"error: {error}\n"


def test_a_bug_and_a_debug_run_keep_the_traceback(monkeypatch):
    monkeypatch.delenv("DS_CONTRASTIVE_DEBUG", raising=False)
    with pytest.raises(KeyError):
        with clean_errors():
            raise KeyError("a bug")
    with pytest.raises(ConfigError):
        with clean_errors(debug=True):
            raise ConfigError("bad key")
    monkeypatch.setenv("DS_CONTRASTIVE_DEBUG", "1")
    with pytest.raises(ConfigError):
        with clean_errors():
            raise ConfigError("bad key")


def test_exit_codes_are_distinct_per_kind_and_documented():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for kind, code in EXIT_CODES.items():
        assert f"| {code} | `{kind.__name__}`" in readme, kind.__name__
    assert len({EXIT_CODES[ConfigError], EXIT_CODES[DataError], EXIT_CODES[OutputDirError]}) == 3
