"""AgentSD settings in ``agentsd bench`` (issue 14, item 1): ``--max-downsample`` and the other
``apply_patch`` settings reach every AgentSD method, and ``max_downsample`` also the layers tomesd
and the bound work on."""

from __future__ import annotations

import csv

import pytest
import torch

import agentsd
from agentsd.tools.archs import build_unet, step_inputs, unet_config
from agentsd.tools.cli import main
from agentsd.tools.methods import Method, agentsd_settings, patcher


@pytest.fixture(scope="module")
def xl():
    """tiny-xl: attention at /2 and /4 (none at /1), as SDXL; 128 px = 16x16 latent tokens."""
    unet = build_unet(unet_config("tiny-xl"), torch.float32, torch.device("cpu"), seed=0)
    return unet, step_inputs(unet, 2, 128, 128, seed=0)


def forward(unet, inputs: dict) -> torch.Tensor:
    rest = {name: value for name, value in inputs.items() if name != "sample"}
    with torch.no_grad():
        return unet(inputs["sample"], 999, return_dict=False, **rest)[0]


def test_agentsd_settings_keep_the_methods_own_ratio_and_phase():
    settings = agentsd_settings(Method("agentsd-tome", 0.3), {"sx": 2, "agent_until": 0.9, "ratio": 0.1}, 5)
    assert settings == {"sx": 2, "ratio": 0.3, "seed": 5, "agent_until": 0.0}


def test_max_downsample_reaches_agentsd_tomesd_and_the_bound(xl, one_thread):
    unet, inputs = xl
    deeper = {"max_downsample": 4}
    method = Method("agentsd-agent", 0.4)

    apply, remove = patcher(method, unet, seed=0, settings=deeper)
    apply()
    given = forward(unet, inputs)
    remove()
    agentsd.apply_patch(unet, ratio=0.4, agent_until=1.0, merge_until=1.0, seed=0, max_downsample=4)
    direct = forward(unet, inputs)
    agentsd.remove_patch(unet)
    apply, remove = patcher(method, unet, seed=0)
    apply()
    default = forward(unet, inputs)
    remove()
    assert torch.equal(given, direct) and not torch.equal(given, default)

    apply, remove = patcher(Method("bound"), unet, settings=deeper)
    apply()
    zeroed = {name for name, p in unet.attn_processors.items() if type(p).__name__ == "ZeroSelfAttention"}
    remove()
    assert zeroed == set(agentsd.patch_targets(unet, max_downsample=4))
    assert len(zeroed) > len(agentsd.patch_targets(unet))  # the /4 level too

    apply, remove = patcher(Method("tomesd", 0.4), unet, settings=deeper)
    apply()
    try:
        assert unet._tome_info["args"]["max_downsample"] == 4  # tomesd's own record of its level
    finally:
        remove()


def test_bench_passes_max_downsample_and_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["bench", "--random-weights", "--arch", "tiny-xl", "--resolution", "128", "--methods", "tomesd",
               "agentsd-agent", "agentsd-agent+mlp", "tomesd:0.4+mlp+xattn", "bound", "--ratios", "0.4",
               "--max-downsample", "4", "--no-use-rand", "--repeats", "1", "--threads", "1", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["agentsd_settings"] for row in rows} == {"max_downsample=4;use_rand=False"}
    # the whole-block merge next to the default, in one interleaved run (issue 15's rows)
    assert [row["method"] for row in rows] == ["unpatched", "tomesd:0.4", "tomesd:0.4+mlp+xattn",
                                               "agentsd-agent:0.4", "agentsd-agent:0.4+mlp", "bound"]
    assert all(float(row["step_s"]) > 0 for row in rows)
    report = (out / "results.md").read_text()
    assert "tomesd on tiny-xl: max_downsample=4, as --max-downsample gives every AgentSD method" in report
    assert "AgentSD settings of every AgentSD method: max_downsample=4, use_rand=False" in report
    assert "--max-downsample 4 --no-use-rand" in report  # the command that reproduces the run
    assert "| agentsd-agent:0.4+mlp | 0.4 | tiny-xl | 128² |" in report and "- +mlp / +xattn: " in report


@pytest.mark.parametrize("args, message", [
    (["--arch", "tiny-xl", "--max-downsample", "1"], "tiny-xl: --max-downsample 1:"),
    (["--arch", "tiny", "--max-downsample", "3"], "max_downsample"),
    (["--arch", "tiny", "--sx", "0"], "sx"),
])
def test_bad_settings_fail_with_one_line_before_measuring(tmp_path, capsys, args, message):
    rc = main(["bench", "--random-weights", "--resolution", "64", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_settings_the_methods_set_have_no_flag(tmp_path, capsys):
    """ratio, agent_until and merge_until come from the methods (agentsd-agent, agentsd-tome)."""
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--random-weights", "--agent-until", "0.5", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --agent-until" in err
