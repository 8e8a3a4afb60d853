"""The options every tool shares: one flag, one meaning, one range, one message (issue 16).

Each case runs ``agentsd generate``, ``agentsd eval`` and ``agentsd bench`` with the same bad value and
expects the same one-line error from each, before any model loads. All of them failed before the
shared module (generate and eval: phase A; bench: phase B): the tools accepted different ranges or
said different things.
"""

from __future__ import annotations

import json

import pytest

from agentsd.tools import loading
from agentsd.tools.cli import main

pytestmark = pytest.mark.usefixtures("offline")


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was checked")


def _error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    prefix = f"agentsd {command}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix):].strip()


COMMANDS = {  # two images either way, so seed + 1 is used
    "generate": ["generate", "a cat", "--images-per-prompt", "2"],
    "eval": ["eval", "--num-images", "2", "--no-fid", "--no-clip"],
    "bench": ["bench", "--batch-size", "2", "--measure", "generation"],
}


def _errors(tiny_sd_dir, tmp_path, capsys, monkeypatch, *args: str) -> set[str]:
    """The errors of generate, eval and bench for ``args``, on one model; none may load it."""
    monkeypatch.setattr(loading, "load_pipeline", _must_not_load)
    found = set()
    for command, start in COMMANDS.items():
        assert main([*start, "--out", str(tmp_path / command), "--model", str(tiny_sd_dir), *args]) == 2
        found.add(_error(capsys, command))
        assert not (tmp_path / command).exists()
    return found


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "--seed must be in [0, 9223372036854775806]"),
        (["--seed", str(2**63 - 1)], "(image i uses seed + i, up to seed + 1)"),
        (["--guidance", "-3"], "--guidance must be a finite number >= 0, got -3"),
        (["--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--resolution", "36"], "--resolution 36: sizes must be positive multiples of 8"),
        (["--resolution", "64x"], "--resolution '64x' is not SIDE or WIDTHxHEIGHT"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_a_shared_flag_has_one_range_and_one_message(args, message, tiny_sd_dir, tmp_path, capsys,
                                                       monkeypatch):
    errors = _errors(tiny_sd_dir, tmp_path, capsys, monkeypatch, *args)
    assert len(errors) == 1 and message in errors.pop()


@pytest.mark.parametrize(
    ("scheduler", "steps", "message"),
    [
        # above the training timesteps: was OOM-killed (generate) or ran with every timestep 1
        ("pndm", "1000000000", "--steps 1000000000 is more than the 1000 timesteps"),
        ("pndm", "1001", "--steps 1001 is more than the 1000 timesteps"),
        # diffusers' own refusal, reported as a bug in agentsd before
        ("ddim", "5000", "--steps 5000 is more than the 1000 timesteps"),
        # within the training timesteps, but the schedule reaches timestep 1000 (an IndexError mid-run)
        ("pndm", "1000", "--steps 1000: the PNDMScheduler schedule reaches timestep 1000"),
        ("dpm++", "999", "--steps 999: the DPMSolverMultistepScheduler schedule reaches timestep 1000"),
    ],
)
def test_steps_are_checked_against_the_scheduler_before_loading(scheduler, steps, message, tiny_sd_dir,
                                                                 tmp_path, capsys, monkeypatch):
    errors = _errors(tiny_sd_dir, tmp_path, capsys, monkeypatch, "--scheduler", scheduler, "--steps", steps)
    assert len(errors) == 1
    error = errors.pop()
    assert message in error and "use at most" in error


def test_random_weights_check_steps_against_the_shipped_scheduler(tmp_path, capsys):
    """bench with random weights runs the scheduler config shipped with the arch: steps are checked
    against it, before anything is built (it took 5000 DDIM steps and failed in diffusers)."""
    out = str(tmp_path / "out")
    for arch, steps, message in (("tiny", "1000", "--steps 1000: the PNDMScheduler schedule reaches"),
                                 ("tiny-xl", "1001", "--steps 1001 is more than the 1000 timesteps")):
        assert main(["bench", "--random-weights", "--arch", arch, "--steps", steps, "--out", out]) == 2
        assert message in _error(capsys, "bench")
    assert not (tmp_path / "out").exists()


def test_schedule_limits_come_from_the_scheduler_config():
    """More steps than training timesteps makes "leading" spacing's stride 0: every timestep the same."""
    from agentsd.tools.errors import UsageError
    from agentsd.tools.options import check_schedule

    config = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000,
              "timestep_spacing": "leading", "steps_offset": 1}
    check_schedule(config, None, 999)
    with pytest.raises(UsageError, match="--steps 1001 is more than the 1000 timesteps"):
        check_schedule(config, None, 1001)
    short = {**config, "num_train_timesteps": 10}
    with pytest.raises(UsageError, match="use at most 9"):
        check_schedule(short, "ddim", 10)


def test_batch_size_is_images_per_pipeline_call_in_eval_and_bench(tmp_path, capsys):
    """bench had --batch, a UNet batch (2 = one image with CFG); eval --batch-size, images per call."""
    from agentsd.tools.bench import BenchConfig
    from agentsd.tools.bench.config import check_config

    for command in ("eval", "bench"):
        assert main([*COMMANDS[command], "--model", "m", "--batch-size", "0", "--out", str(tmp_path)]) == 2
        assert _error(capsys, command) == "--batch-size must be at least 1, got 0"
    plan = check_config(BenchConfig(archs=["tiny"], batch_size=3, out=tmp_path / "out"))
    assert plan.unet_batch == 6  # a UNet step runs both halves of classifier-free guidance
    plan = check_config(BenchConfig(archs=["tiny"], batch_size=3, guidance=1, out=tmp_path / "out"))
    assert plan.unet_batch == 3


def test_dtype_has_one_set_of_choices(tmp_path, capsys):
    """bench's --dtype took any text and refused it later in its own words."""
    errors = set()
    for command, start in COMMANDS.items():
        with pytest.raises(SystemExit) as exit_info:
            main([*start, "--dtype", "fp64", "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        errors.add(_error(capsys, command))
    assert len(errors) == 1
    assert "argument --dtype: invalid choice: 'fp64'" in errors.pop()


def test_bench_runs_on_mps_as_the_other_commands(tmp_path, monkeypatch):
    """bench refused --device mps ("the benchmark runs on cpu or cuda") and timed auto on the CPU of a
    Mac; the shared meaning is auto = CUDA, then MPS, then CPU (its timer and memory probe know MPS)."""
    import torch

    from agentsd.tools.bench import BenchConfig
    from agentsd.tools.bench.config import check_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for device in ("mps", "auto"):
        plan = check_config(BenchConfig(archs=["tiny"], device=device, out=tmp_path / "out"))
        assert plan.device == torch.device("mps") and plan.dtype == torch.float32


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("old", ["--height", "--width"])
def test_height_and_width_name_the_resolution_flag(command, old, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*COMMANDS[command], old, "64", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = _error(capsys, command)
    assert f"{old} is now --resolution" in err and "--resolution WIDTHxHEIGHT" in err


def test_compile_mode_has_one_range_and_one_message_in_generate_and_bench(tiny_sd_dir, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setattr(loading, "load_pipeline", _must_not_load)
    found = set()
    for command in ("generate", "bench"):
        start = [*COMMANDS[command], "--out", str(tmp_path / command), "--model", str(tiny_sd_dir)]
        assert main([*start, "--compile-mode", "reduce-overhead"]) == 2
        found.add(_error(capsys, command))
        with pytest.raises(SystemExit):
            main([*start, "--compile", "--compile-mode", "max-autotune"])  # not one of the choices
        choices = "choose from 'default', 'reduce-overhead', 'max-autotune-no-cudagraphs'"
        assert choices in capsys.readouterr().err
        assert not (tmp_path / command).exists()
    assert found == {"--compile-mode reduce-overhead applies to a compiled UNet: add --compile"}


def test_help_is_the_same_for_every_shared_flag(capsys):
    import dataclasses

    from agentsd.tools.options import Options

    texts = {}
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        texts[command] = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(Options):
        flag, help_text = "--" + field.name, field.metadata["help"]
        for command, text in texts.items():
            if field.name == "resolution" and command == "bench":  # several sizes, and it says so
                help_text = help_text.replace("image size", "image sizes")
                assert "--resolution SIDE|WxH [SIDE|WxH ...]" in text
            assert flag in text and " ".join(help_text.split())[:50] in text, (command, flag)
    batch = "--batch-size N images per pipeline call, at least 1"
    assert batch in texts["eval"] and batch in texts["bench"] and "--batch-size" not in texts["generate"]


def test_the_model_own_scheduler_is_read_from_its_folder(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    """The model's own scheduler (generate's default) is read from the folder, not assumed."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text((tiny_sd_dir / "model_index.json").read_text())
    (model / "scheduler").mkdir()
    config = json.loads((tiny_sd_dir / "scheduler" / "scheduler_config.json").read_text())
    config["num_train_timesteps"] = 20
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(loading, "load_pipeline", _must_not_load)
    out = str(tmp_path / "o")
    assert main(["generate", "a cat", "--model", str(model), "--steps", "25", "--out", out]) == 2
    assert "--steps 25 is more than the 20 timesteps" in _error(capsys, "generate")


def test_help_states_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--seed <its seed>; in [0, 2**63), the last image's seed too (default: 0)",
                  "(default: images)", "show progress bars (default: True)", "(default: False)"):
        assert shown in text, shown


# generate's --no-patch picks a mode (beside --compare), it does not switch a setting off
_MODE_FLAGS = {"--no-patch"}


def test_every_on_off_flag_is_a_pair_in_every_command():
    """Each ``--no-x`` has its ``--x`` in the same flag, in every command (eval's ``--no-clip`` was a
    lone switch beside ``--fid/--no-fid``: ``--clip`` was taken as an abbreviation of ``--clip-model``)."""
    from agentsd.tools.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, parser in commands.items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--no-") and flag not in _MODE_FLAGS:
                    assert "--" + flag[5:] in action.option_strings, f"agentsd {name} {flag}"


def test_clip_score_switches_like_fid(tmp_path):
    from agentsd.tools.cli import build_parser
    from agentsd.tools.evaluate.command import config_from_args

    def config(*flags: str):
        return config_from_args(build_parser().parse_args(["eval", "--out", str(tmp_path), *flags]))

    assert config().clip and config("--clip").clip and not config("--no-clip").clip
    assert config("--clip-model", "my/clip").clip_model == "my/clip"
    assert not config("--no-fid").fid and config("--fid").fid
