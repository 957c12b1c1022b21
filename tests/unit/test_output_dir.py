"""An output_dir holding a run is refused, replaced only on request (removing that run's files and nothing else),
resumed as before, and never shared with a run in progress."""

import json
import subprocess
import sys

import pytest

from ds_contrastive.errors import ConfigError, OutputDirError
from ds_contrastive.run.config import load_train_config
from ds_contrastive.run.output_dir import LOCK, claimed

MODEL_FILES = ["config.json", "model.safetensors", "modules.json", "1_Pooling"]


def finished_run(out):
    """What a finished launch/train.py run leaves: its model, metrics, summary (listing the model) and a report."""
    out.mkdir(parents=True)
    for name in MODEL_FILES:
        (out / name).mkdir() if "." not in name else (out / name).write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "run_config.json").write_text("{}")
    (out / "report").mkdir()
    (out / "report" / "index.html").write_text("<html>")
    (out / "summary.json").write_text(json.dumps({"steps": 16, "model_files": MODEL_FILES}))
    (out / "notes.txt").write_text("the user's own file")


def config(out, **overrides):
    return load_train_config(None, {"output_dir": str(out), **overrides})


def test_a_new_directory_is_claimed_and_its_lock_released_after_the_run(tmp_path):
    out = tmp_path / "run"
    with claimed(config(out)) as resume_from:
        assert resume_from is None and (out / LOCK).is_file()
    assert not (out / LOCK).exists()
    (out / "wandb").mkdir()  # a bare wandb/ (or report/) is no run: nothing refused, nothing removed
    with claimed(config(out, resume="auto")):
        pass
    assert (out / "wandb").is_dir()


def test_a_finished_run_is_refused_naming_the_options_and_left_as_it_was(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputDirError, match=r"holds a finished run of 16 steps .*pass --overwrite_output_dir true to "
                                             r"replace it .*or choose another --output_dir"):
        with claimed(config(out)):
            pass
    assert sorted(p.name for p in out.iterdir()) == before


def test_overwrite_removes_the_old_run_report_included_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "run"
    finished_run(out)
    with claimed(config(out, overwrite_output_dir="true")) as resume_from:
        assert resume_from is None
        assert sorted(p.name for p in out.iterdir()) == [LOCK, "notes.txt"]
    assert f"replacing a finished run of 16 steps in {out}: removed summary.json, run_config.json, metrics.jsonl, " \
           "report, its model (4 files)" in capsys.readouterr().out


def test_a_running_run_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from ds_contrastive.run.output_dir import lock
held = lock(__import__("pathlib").Path({str(out)!r}))
print("locked", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert "locked" in iter(lambda: holder.stdout.readline().strip(), "")  # after any import-time logs
        with pytest.raises(OutputDirError, match=rf"is being written by a running run \(pid {holder.pid} on "):
            with claimed(config(out, overwrite_output_dir="true")):
                pass
    finally:
        holder.kill()
        holder.wait()
    with claimed(config(out)):  # the lock died with its process; the lock file alone is no run's output
        pass
    assert not (out / LOCK).exists()


def test_resume_auto_without_a_checkpoint(tmp_path):
    unfinished = tmp_path / "killed_early"  # a requeued job killed before its first checkpoint starts afresh
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text('{"step": 1}\n')
    (unfinished / LOCK).write_text("pid 1 on gone")
    with claimed(config(unfinished, resume="auto")) as resume_from:
        assert resume_from is None and not (unfinished / "metrics.jsonl").exists()
    finished = tmp_path / "finished"
    finished_run(finished)
    for resume in ("auto", str(tmp_path / "elsewhere")):
        with pytest.raises(OutputDirError, match="holds a finished run of 16 steps: there is nothing to resume"):
            with claimed(config(finished, resume=resume)):
                pass


def test_a_failed_or_killed_run(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="model failed to load"):
        with claimed(config(out)):
            raise RuntimeError("model failed to load")
    assert list(out.iterdir()) == []  # nothing written: the corrected command runs without --overwrite_output_dir
    with pytest.raises(RuntimeError):
        with claimed(config(out)):
            (out / "metrics.jsonl").write_text('{"step": 1}\n')
            raise RuntimeError("killed mid-run")
    with pytest.raises(OutputDirError, match=r"holds an unfinished run \(newest checkpoint: none\) \(metrics.jsonl\)"):
        with claimed(config(out)):
            pass


def test_an_output_dir_that_cannot_be_one_is_an_error_not_a_traceback(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputDirError, match="cannot use .*file as output_dir"):
        with claimed(config(tmp_path / "file")):
            pass


def test_resume_and_overwrite_exclude_each_other():
    with pytest.raises(ConfigError, match="resume continues the run in output_dir and overwrite_output_dir replaces"):
        load_train_config(None, {"resume": "auto", "overwrite_output_dir": "true"})
