"""``adai-lightning``'s configuration errors (one line, exit 2, traceback only with --debug), its help,
short callback names, LightningCLI's args warning, and ``--ckpt_path`` checks (issue 14 item 5, issue 11).

Run in-process: each error is raised before training starts, so each case takes a second or two.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from adai_lightning.cli import AdaiCLI, ConfigurationError, main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "recipes" / "default.yaml")


def quick(tmp_path: Path) -> list[str]:
    return ["fit", "--config", DEFAULT, "--trainer.max_epochs", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path), "--test_after_fit",
            "false", "--data.batch_size", "256"]


def run_main(capsys, *args: str) -> tuple[int, list[str]]:
    """``main(args)``: its exit status and the non-empty lines it wrote to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize(("args", "message"), [
    (["--optimizer.lr", "-1"], "Invalid lr: -1.0; it must lie in [0, inf)"),
    (["--trainer.callbacks+=adai_lightning.callbacks.InertiaMonitor", "--trainer.callbacks.every_n_train_steps=-3"],
     "Invalid every_n_train_steps: -3; it must be None or an integer >= 1"),
    (["--data.batch_size", "0"], "Invalid batch_size: 0; it must be >= 1"),
    (["--trainer.max_epochs", "abc"], "trainer.max_epochs: Expected a <class 'int'>. Got value: abc"),
    (["--optimizer", "NoSuchOptimizer"], "optimizer: Expected a dot import path string: NoSuchOptimizer"),
    (["--trainer.no_such_option", "1"], "unrecognized arguments: --trainer.no_such_option 1"),
], ids=["range", "callback-argument", "data-argument", "type", "class-name", "unknown-option"])
def test_configuration_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    code, lines = run_main(capsys, *quick(tmp_path), *args)
    assert code == 2
    assert lines[-1] == f"error: {message}"
    assert not any("Traceback" in line for line in lines) and len(lines) == 1


def test_a_missing_dataset_is_one_line(tmp_path, capsys):
    """Found only when the run starts (the data module's setup): still a configuration error."""
    code, lines = run_main(capsys, "fit", "--config", str(ROOT / "recipes" / "cifar10_resnet18.yaml"),
                           "--data.root", str(tmp_path / "nowhere"), "--trainer.accelerator", "cpu",
                           "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path))
    assert code == 2 and lines[-1].startswith("error: CIFAR10 not found (or corrupted) under ")
    assert str(tmp_path / "nowhere") in lines[-1] and "--data.download true" in lines[-1]


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAI_LIGHTNING_DEBUG", "0")  # restored (unset) afterwards, though --debug sets it
    with pytest.raises(ConfigurationError, match="Invalid lr") as error:
        main(["--debug", *quick(tmp_path), "--optimizer.lr", "-1"])
    assert isinstance(error.value.__cause__, ValueError)
    monkeypatch.setenv("ADAI_LIGHTNING_DEBUG", "1")
    with pytest.raises(ConfigurationError, match="Invalid lr"):
        main([*quick(tmp_path), "--optimizer.lr", "-1"])


def test_errors_during_training_keep_their_traceback(tmp_path):
    """Only configuration errors are shortened: a failure of the run itself propagates unchanged."""
    class Boom(RuntimeError):
        pass

    from lightning.pytorch.callbacks import Callback

    class FailingCallback(Callback):
        def on_train_batch_end(self, *args, **kwargs):
            raise Boom("inside training")

    with pytest.raises(Boom):
        AdaiCLI(args=[*quick(tmp_path), "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"],
                trainer_defaults={"callbacks": [FailingCallback()]})


def test_help_lists_report_and_compare(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "adai-lightning report RUN_DIR" in text and "adai-lightning compare" in text
    assert "ADAI_LIGHTNING_DEBUG" in text


def test_short_callback_names_work(tmp_path):
    cli = AdaiCLI(args=[*quick(tmp_path), "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                        "--trainer.callbacks", "[]", "--trainer.callbacks+=InertiaMonitor",
                        "--trainer.callbacks.every_n_train_steps=1", "--trainer.enable_checkpointing", "false"])
    from adai_lightning.callbacks import InertiaMonitor

    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, InertiaMonitor)]
    assert monitor.every_n_train_steps == 1 and cli.trainer.global_step == 2


def test_short_optimizer_name_from_the_command_line_gives_no_args_warning(tmp_path, monkeypatch):
    """The console script reads sys.argv; the short name is qualified there, not passed as ``args``."""
    argv = ["adai-lightning", *quick(tmp_path), "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches",
            "0", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false", "--optimizer", "Adai"]
    monkeypatch.setattr(sys, "argv", argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main()
    assert not [w for w in caught if "not recommended to provide both args" in str(w.message)]
    assert sys.argv[sys.argv.index("--optimizer") + 1] == "adai_lightning.Adai"  # what DDP's re-launch will read


def test_an_explicit_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    code, lines = run_main(capsys, *quick(tmp_path), "--ckpt_path", str(bad))
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: checkpoint {bad} cannot be loaded (")


def test_last_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    """A truncated ``last.ckpt`` (a writer without atomic renames, a full disk): ``--ckpt_path last``
    warns, naming it, and resumes from the periodic checkpoint of the same step."""
    folder = tmp_path / "checkpoints"
    periodic = ["--trainer.callbacks", "[]", "--trainer.callbacks+=adai_lightning.recipes.checkpointing.PeriodicCheckpoint",
                f"--trainer.callbacks.dirpath={folder}", "--trainer.callbacks.every_n_train_steps=5",
                "--trainer.callbacks.save_last=true", "--trainer.callbacks.enable_version_counter=false"]
    first = AdaiCLI(args=[*quick(tmp_path), *periodic])
    last = folder / "last.ckpt"
    assert first.trainer.global_step == 5 and last.exists() and (folder / "epoch=0-step=5.ckpt").exists()
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.warns(UserWarning, match=f"checkpoint {last} cannot be loaded"):
        resumed = AdaiCLI(args=[*quick(tmp_path), *periodic, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 10
    assert torch.load(last, weights_only=False)["global_step"] == 10  # rewritten whole
