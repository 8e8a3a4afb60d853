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
