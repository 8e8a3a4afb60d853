"""agentsd.tools.methods: the one registry of methods that bench and eval compare."""

from __future__ import annotations

import pytest

from agentsd.tools.methods import (
    DEFAULT_METHODS,
    MAX_RATIO,
    Method,
    applied,
    parse_method,
    parse_methods,
    ratio_text,
)


def test_specs_and_their_order():
    methods = parse_methods(DEFAULT_METHODS)
    assert [m.name for m in methods] == ["unpatched"] + [f"tomesd:0.{i}" for i in range(1, 6)] + [
        f"agentsd:0.{i}" for i in range(1, 6)
    ]
    assert parse_methods(["unpatched,agentsd:0.4", "tomesd:.3"]) == [
        Method("unpatched"), Method("agentsd", 0.4), Method("tomesd", 0.3)
    ]
    assert parse_methods("unpatched,tomesd:0.2") == [Method("unpatched"), Method("tomesd", 0.2)]
    assert Method("agentsd", 0.4).slug == "agentsd-0.4"
    assert sorted([Method("bound"), Method("agentsd", 0.2), Method("unpatched"), Method("tomesd", 0.5)],
                  key=lambda m: m.order)[0] == Method("unpatched")


def test_the_old_eval_spelling_is_an_alias():
    assert parse_method("baseline") == Method("unpatched")
    assert parse_method("tome:0.5") == Method("tomesd", 0.5)
    assert Method("unpatched").legacy_slugs == ("baseline",)
    assert Method("tomesd", 0.5).legacy_slugs == ("tome-0.5",)


def test_bare_kinds_take_the_ratios():
    methods = parse_methods(["unpatched", "agentsd", "tomesd:0.3", "bound"], ratios=[0.2, 0.4])
    assert [m.name for m in methods] == ["unpatched", "agentsd:0.2", "agentsd:0.4", "tomesd:0.3", "bound"]
    with pytest.raises(ValueError, match="needs a ratio"):
        parse_methods(["agentsd"])


@pytest.mark.parametrize(
    "spec, message",
    [("fast", "unknown method"), ("agentsd", "needs a ratio"), ("tome:x", "not a number"),
     ("agentsd:0.9", rf"must be in \[0, {MAX_RATIO}\]"), ("agentsd:nan", "must be in"),
     ("baseline:0.1", "takes no ratio"), ("bound:0.2", "takes no ratio")],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_methods([spec])


def test_duplicates_are_refused():
    with pytest.raises(ValueError, match="given twice"):
        parse_methods(["agentsd:0.4", "agentsd:0.40"])
    with pytest.raises(ValueError, match="given twice"):
        parse_methods(["baseline", "unpatched"])


def test_close_ratios_get_their_own_folders():
    """`{ratio:g}` named both agentsd-0.3125: one row's metrics came from the other's images."""
    a, b = parse_method("agentsd:0.3125"), parse_method("agentsd:0.31249995")
    assert a != b
    assert a.slug == "agentsd-0.3125" and b.slug == "agentsd-0.31249995"
    assert parse_methods(["agentsd:0.3125", "agentsd:0.31249995"]) == [a, b]
    assert ratio_text(0.1) == "0.1" and ratio_text(0.5) == "0.5"  # folders of earlier runs keep their names
    assert float(ratio_text(0.1 + 0.2)) == 0.1 + 0.2


def test_applied_patches_and_restores(tiny_unet):
    from agentsd.tools.bench.cases import fingerprint

    before = fingerprint(tiny_unet)
    for spec in ("tomesd:0.5", "agentsd:0.5", "agentsd-agent:0.5", "agentsd-tome:0.5", "bound"):
        with applied(tiny_unet, parse_method(spec)):
            assert fingerprint(tiny_unet) != before, spec
        assert fingerprint(tiny_unet) == before, spec


def test_block_merges_are_part_of_the_spec():
    """Issue 16: +mlp / +xattn (merge_mlp / merge_crossattn) in the one registry, for bench and eval."""
    method = parse_method("agentsd-agent:0.4+MLP")
    assert method == Method("agentsd-agent", 0.4, ("mlp",))
    assert (method.name, method.slug, method.family, method.label) == (
        "agentsd-agent:0.4+mlp", "agentsd-agent-0.4+mlp", "agentsd-agent+mlp", "AgentSD agent phase +mlp")
    assert method.settings == {"merge_mlp": True}
    both = parse_method("tomesd:0.4+xattn+mlp")  # one canonical name, whatever the order given
    assert both.name == "tomesd:0.4+mlp+xattn" and parse_method(both.name) == both
    assert both.settings == {"merge_mlp": True, "merge_crossattn": True}
    methods = parse_methods(["agentsd+mlp", "agentsd", "unpatched"], ratios=[0.2, 0.4])
    assert [m.name for m in sorted(methods, key=lambda m: m.order)] == [
        "unpatched", "agentsd:0.2", "agentsd:0.4", "agentsd:0.2+mlp", "agentsd:0.4+mlp"]
    assert parse_methods(["agentsd:0.4", "agentsd:0.4+mlp"])[0] != parse_methods(["agentsd:0.4+mlp"])[0]


@pytest.mark.parametrize("spec, message", [
    ("agentsd:0.4+ff", r"block merge \+ff is not mlp or xattn"), ("agentsd:0.4+mlp+mlp", "given twice"),
    ("bound+mlp", "bound takes no block merge"), ("unpatched+xattn", "unpatched takes no block merge"),
])
def test_bad_block_merges(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_methods([spec])


def test_block_merges_reach_agentsd_and_tomesd(tiny_unet):
    import torch

    import agentsd
    from agentsd.tools.methods import patcher

    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return tiny_unet(sample, 999, context, return_dict=False)[0]

    outputs = {}
    for spec in ("agentsd-agent:0.5", "agentsd-agent:0.5+mlp"):
        with applied(tiny_unet, parse_method(spec)):
            outputs[spec] = forward()
    agentsd.apply_patch(tiny_unet, ratio=0.5, agent_until=1.0, merge_until=1.0, merge_mlp=True)
    direct = forward()
    agentsd.remove_patch(tiny_unet)
    assert torch.equal(outputs["agentsd-agent:0.5+mlp"], direct)
    assert not torch.equal(outputs["agentsd-agent:0.5"], direct)

    apply, remove = patcher(parse_method("tomesd:0.5+mlp+xattn"), tiny_unet)
    apply()
    try:
        args = tiny_unet._tome_info["args"]  # tomesd's own record of its settings
        assert (args["merge_mlp"], args["merge_crossattn"], args["merge_attn"]) == (True, True, True)
    finally:
        remove()


def test_eval_and_bench_plan_block_merges(tiny_sd_dir, tmp_path):
    from agentsd.tools.bench import BenchConfig
    from agentsd.tools.bench.config import check_config
    from agentsd.tools.evaluate import EvalConfig
    from agentsd.tools.evaluate.config import check

    plan = check(EvalConfig(model=str(tiny_sd_dir), out=tmp_path / "e", num_images=2, fid=False,
                            clip=False, methods=["unpatched", "agentsd:0.4+mlp"]))
    assert [m.slug for m in plan.methods] == ["unpatched", "agentsd-0.4+mlp"]  # its images' folder
    plan = check_config(BenchConfig(archs=["tiny"], methods=["agentsd-agent+mlp", "tomesd+xattn"],
                                    ratios=[0.4], out=tmp_path / "b"))
    assert [m.name for m in plan.methods] == ["unpatched", "tomesd:0.4+xattn", "agentsd-agent:0.4+mlp"]
