"""Tests of detkit.config: _base_ merging, origins, interpolation, paths, overrides, schema
validation messages and the dump/load round trip. Every expectation is written out by hand."""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import pytest
import yaml

from detkit.config import (
    COMMAND_LINE,
    ConfigError,
    PathStr,
    apply_overrides,
    dump_config,
    from_dict,
    load_config,
    load_yaml,
    resolve_path,
    to_dict,
)

# ----------------------------------------------------------------------------------------
# Small schemas (module level: string annotations are resolved with the module's globals)
# ----------------------------------------------------------------------------------------


@dataclass
class RPN:
    nms_thresh: float = 0.7
    pre_nms_top_n: int = 2000
    anchor_sizes: Tuple[int, ...] = (32, 64, 128)
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])


@dataclass
class Model:
    num_classes: int
    pooler: Literal["roi_pool", "roi_align"] = "roi_align"
    rpn: Optional[RPN] = field(default_factory=RPN)
    input_size: Tuple[int, int] = (600, 1000)
    loss_weights: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")


@dataclass
class Data:
    root: PathStr = ""
    extra_roots: List[PathStr] = field(default_factory=list)
    cache_dir: Optional[str] = field(default=None, metadata={"path": True})
    name: str = "bccd"


@dataclass
class Cfg:
    model: Model
    data: Data = field(default_factory=Data)
    lr: float = 0.01
    max_iter: int = 100
    flip: bool = True
    seed: Union[int, str] = 0
    extra: Any = None


def write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in tmp_path so that file names in messages are short relative paths."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------------------
# _base_ inheritance and origins
# ----------------------------------------------------------------------------------------


def test_single_base_deep_merge_and_origins(in_tmp):
    base = write(
        in_tmp,
        "base.yaml",
        """
        a: 1
        b: {c: 2, d: 3, l: [1, 2, 3]}
    """,
    )
    child = write(
        in_tmp,
        "child.yaml",
        """
        _base_: base.yaml
        b: {c: 5, l: [9]}
        e: x
    """,
    )
    data, origins = load_yaml("child.yaml")
    assert data == {"a": 1, "b": {"c": 5, "d": 3, "l": [9]}, "e": "x"}
    assert origins == {
        "": str(child),
        "a": str(base),
        "b": str(child),
        "b.c": str(child),
        "b.d": str(base),
        "b.l": str(child),
        "e": str(child),
    }


def test_several_bases_later_base_wins(in_tmp):
    write(in_tmp, "one.yaml", "x: 1\ny: 1\nz: {p: 1, q: 1}\n")
    write(in_tmp, "two.yaml", "x: 2\nz: {p: 2}\n")
    write(in_tmp, "a.yaml", "_base_: [one.yaml, two.yaml]\n")
    write(in_tmp, "b.yaml", "_base_: [two.yaml, one.yaml]\n")
    data_a, origins_a = load_yaml("a.yaml")
    data_b, _ = load_yaml("b.yaml")
    assert data_a == {"x": 2, "y": 1, "z": {"p": 2, "q": 1}}
    assert data_b == {"x": 1, "z": {"p": 1, "q": 1}, "y": 1}
    assert origins_a["z.p"] == str(in_tmp / "two.yaml")
    assert origins_a["z.q"] == str(in_tmp / "one.yaml")


def test_nested_base_chain_paths_relative_to_including_file(in_tmp):
    write(in_tmp, "configs/_base_/models/m.yaml", "model: {num_classes: 20, pooler: roi_pool}\n")
    write(
        in_tmp,
        "configs/_base_/mid.yaml",
        """
        _base_: models/m.yaml
        model: {num_classes: 3}
        lr: 0.02
    """,
    )
    write(in_tmp, "configs/exp/x.yaml", "_base_: ../_base_/mid.yaml\nlr: 0.005\n")
    data, origins = load_yaml(in_tmp / "configs/exp/x.yaml")
    assert data == {"model": {"num_classes": 3, "pooler": "roi_pool"}, "lr": 0.005}
    assert origins["model.pooler"] == str(in_tmp / "configs/_base_/models/m.yaml")
    assert origins["model.num_classes"] == str(in_tmp / "configs/_base_/mid.yaml")
    assert origins["lr"] == str(in_tmp / "configs/exp/x.yaml")


def test_delete_replaces_instead_of_merging(in_tmp):
    write(in_tmp, "base.yaml", "opt: {type: sgd, lr: 0.1, momentum: 0.9}\nkeep: 1\n")
    write(
        in_tmp,
        "child.yaml",
        """
        _base_: base.yaml
        opt: {_delete_: true, type: adam, lr: 0.001}
    """,
    )
    data, origins = load_yaml("child.yaml")
    assert data == {"opt": {"type": "adam", "lr": 0.001}, "keep": 1}
    assert "opt.momentum" not in origins
    # without _delete_ the same child merges
    write(in_tmp, "merge.yaml", "_base_: base.yaml\nopt: {type: adam, lr: 0.001}\n")
    data, _ = load_yaml("merge.yaml")
    assert data["opt"] == {"type": "adam", "lr": 0.001, "momentum": 0.9}
    # a scalar replacing a dict takes the dict's leaves (and their origins) with it
    write(in_tmp, "null.yaml", "_base_: base.yaml\nopt: null\n")
    data, origins = load_yaml("null.yaml")
    assert data == {"opt": None, "keep": 1}
    assert sorted(origins) == ["", "keep", "opt"]
    assert origins["opt"] == str(in_tmp / "null.yaml")


def test_delete_must_be_bool(in_tmp):
    write(in_tmp, "x.yaml", "opt: {_delete_: maybe, lr: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_yaml("x.yaml")
    assert str(e.value) == "opt._delete_ must be true or false, got str 'maybe' (in x.yaml)"


def test_diamond_is_not_a_cycle(in_tmp):
    write(in_tmp, "root.yaml", "v: 0\n")
    write(in_tmp, "l.yaml", "_base_: root.yaml\nl: 1\n")
    write(in_tmp, "r.yaml", "_base_: root.yaml\nr: 1\n")
    write(in_tmp, "top.yaml", "_base_: [l.yaml, r.yaml]\n")
    assert load_yaml("top.yaml")[0] == {"v": 0, "l": 1, "r": 1}


def test_cycle_is_reported_with_files(in_tmp):
    write(in_tmp, "a.yaml", "_base_: sub/b.yaml\n")
    write(in_tmp, "sub/b.yaml", "_base_: ../a.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_yaml("a.yaml")
    assert str(e.value) == "cycle in _base_: a.yaml -> sub/b.yaml -> a.yaml"
    write(in_tmp, "self.yaml", "_base_: self.yaml\n")
    with pytest.raises(ConfigError, match=r"^cycle in _base_: self.yaml -> self.yaml$"):
        load_yaml("self.yaml")


def test_missing_base_and_missing_file(in_tmp):
    write(in_tmp, "x.yaml", "_base_: [gone.yaml]\n")
    with pytest.raises(ConfigError) as e:
        load_yaml("x.yaml")
    assert str(e.value) == "x.yaml: _base_ file 'gone.yaml' not found (looked for gone.yaml)"
    with pytest.raises(ConfigError) as e:
        load_yaml("nope.yaml")
    assert str(e.value) == "config file 'nope.yaml' not found"


def test_bad_base_type_and_non_mapping_top_level(in_tmp):
    write(in_tmp, "x.yaml", "_base_: 3\n")
    with pytest.raises(ConfigError) as e:
        load_yaml("x.yaml")
    assert str(e.value) == "x.yaml: _base_ must be a file path or a list of file paths, got int 3"
    write(in_tmp, "l.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError) as e:
        load_yaml("l.yaml")
    assert str(e.value) == "l.yaml: the top level must be a mapping of keys, got list [1, 2]"
    write(in_tmp, "empty.yaml", "# nothing\n")
    assert load_yaml("empty.yaml")[0] == {}


def test_yaml_syntax_error_names_file_and_line(in_tmp):
    write(in_tmp, "bad.yaml", "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError) as e:
        load_yaml("bad.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    # the unclosed flow sequence is only detected at the "c: 3" line (line 3, column 2)
    assert msg.startswith("bad.yaml:3:2: invalid YAML: ")
    write(in_tmp, "tab.yaml", "a:\n  b: 1\n   c: 2\n")
    with pytest.raises(ConfigError, match=r"^tab.yaml:3:\d+: invalid YAML: mapping values are "):
        load_yaml("tab.yaml")


def test_duplicate_key_is_an_error(in_tmp):
    write(in_tmp, "dup.yaml", "lr: 0.1\nmax_iter: 3\nlr: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load_yaml("dup.yaml")
    assert str(e.value) == "dup.yaml:3:1: invalid YAML: duplicate key 'lr' (first at line 1)"


def test_yaml12_scalars(in_tmp):
    write(
        in_tmp,
        "s.yaml",
        """
        lr: 1e-3
        big: 2E+4
        half: .5
        on_: on
        yes_: yes
        t: true
        octal_like: 010
        time_like: 1:30
        date: 2024-01-02
        hex: 0x10
        n: null
        tilde: ~
    """,
    )
    data, _ = load_yaml("s.yaml")
    assert data == {
        "lr": 0.001,
        "big": 20000.0,
        "half": 0.5,
        "on_": "on",
        "yes_": "yes",
        "t": True,
        "octal_like": "010",
        "time_like": "1:30",
        "date": "2024-01-02",
        "hex": 16,
        "n": None,
        "tilde": None,
    }
    assert type(data["lr"]) is float and type(data["hex"]) is int


# ----------------------------------------------------------------------------------------
# Environment interpolation
# ----------------------------------------------------------------------------------------


def test_env_interpolation(in_tmp, monkeypatch):
    monkeypatch.setenv("DK_A", "alpha")
    monkeypatch.delenv("DK_UNSET", raising=False)
    write(
        in_tmp,
        "e.yaml",
        """
        a: ${DK_A}/x
        b: ${DK_UNSET:fallback}-${DK_A:ignored}
        c: ["pre_${DK_UNSET:}", 3]
        d: $${DK_A} stays
        n: {deep: "${DK_UNSET:../rel/dir}"}
    """,
    )
    data, _ = load_yaml("e.yaml")
    assert data == {
        "a": "alpha/x",
        "b": "fallback-alpha",
        "c": ["pre_", 3],
        "d": "${DK_A} stays",
        "n": {"deep": "../rel/dir"},
    }


def test_env_undefined_without_default(in_tmp, monkeypatch):
    monkeypatch.delenv("DK_UNSET", raising=False)
    write(in_tmp, "base.yaml", "data:\n  root: ${DK_UNSET}/BCCD\n")
    write(in_tmp, "child.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_yaml("child.yaml")
    assert str(e.value) == (
        "data.root: environment variable DK_UNSET is not set and '${DK_UNSET}' has no default (in base.yaml)"
    )
    # a child that overrides the value means the base's variable is never needed
    write(in_tmp, "fixed.yaml", "_base_: base.yaml\ndata: {root: /abs}\n")
    assert load_yaml("fixed.yaml")[0] == {"data": {"root": "/abs"}}


def test_env_malformed_reference(in_tmp):
    write(in_tmp, "m.yaml", "a: ${1BAD}\n")
    with pytest.raises(
        ConfigError,
        match=r"^a: malformed '\$\{\.\.\.\}' in '\$\{1BAD\}'.*"
        r"\(in m.yaml\)$",
    ):
        load_yaml("m.yaml")


# ----------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------


def test_overrides_are_typed_by_yaml():
    data = {"a": {"b": 1}}
    origins = {"": "/x.yaml", "a": "/x.yaml", "a.b": "/x.yaml"}
    out = apply_overrides(
        data,
        ["a.b=0.01", "a.i=7", "a.l=[1,2]", "a.n=null", "a.t=true", "a.s=abc", "a.e=", "a.q='1'", "new.deep.key=x=y"],
        origins,
    )
    assert out is data
    assert data == {
        "a": {"b": 0.01, "i": 7, "l": [1, 2], "n": None, "t": True, "s": "abc", "e": None, "q": "1"},
        "new": {"deep": {"key": "x=y"}},
    }
    assert [type(data["a"][k]) for k in ("b", "i", "t", "s")] == [float, int, bool, str]
    assert origins["a.b"] == COMMAND_LINE and origins["new.deep.key"] == COMMAND_LINE
    assert origins["a"] == "/x.yaml"


def test_override_dict_merges_and_null_parent_is_replaced():
    data = {"m": {"x": 1, "y": 2}, "rpn": None}
    origins = {}
    apply_overrides(data, ["m={y: 3, z: 4}", "rpn.nms_thresh=0.5"], origins)
    assert data == {"m": {"x": 1, "y": 3, "z": 4}, "rpn": {"nms_thresh": 0.5}}
    assert origins == {
        "m": COMMAND_LINE,
        "m.y": COMMAND_LINE,
        "m.z": COMMAND_LINE,
        "rpn": COMMAND_LINE,
        "rpn.nms_thresh": COMMAND_LINE,
    }


def test_malformed_overrides():
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, ["lr0.1"])
    assert str(e.value) == (
        "malformed override 'lr0.1': expected KEY=VALUE with a dotted KEY, e.g. model.rpn.nms_thresh=0.7"
    )
    with pytest.raises(ConfigError, match=r"^malformed override 'a\.\.b=1'"):
        apply_overrides({}, ["a..b=1"])
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, ["a=[1,"])
    assert str(e.value) == (
        "override 'a=[1,': invalid YAML at column 4: expected the node "
        "content, but found '<stream end>' (while parsing a flow node)"
    )
    with pytest.raises(ConfigError) as e:
        apply_overrides({"lr": 0.1}, ["lr.x=1"], {"lr": "/abs/c.yaml"})
    assert str(e.value) == ("override 'lr.x=1': 'lr' is float 0.1, not a mapping (in /abs/c.yaml)")


def test_override_interpolates(monkeypatch):
    monkeypatch.setenv("DK_A", "v")
    data = apply_overrides({}, ["a=${DK_A}_${DK_NOPE_X:d}"])
    assert data == {"a": "v_d"}


# ----------------------------------------------------------------------------------------
# Schema validation
# ----------------------------------------------------------------------------------------


def test_load_config_builds_typed_instance(in_tmp):
    write(
        in_tmp,
        "base.yaml",
        """
        model:
          num_classes: 3
          rpn: {nms_thresh: 1, anchor_sizes: [16, 32]}
          input_size: [480, 640]
          loss_weights: {loss_cls: 1, loss_box: 2.5}
        seed: abc
    """,
    )
    cfg = load_config("base.yaml", Cfg, ["lr=0.1", "model.rpn.pre_nms_top_n=300"])
    assert cfg == Cfg(
        model=Model(
            num_classes=3,
            rpn=RPN(nms_thresh=1.0, pre_nms_top_n=300, anchor_sizes=(16, 32)),
            input_size=(480, 640),
            loss_weights={"loss_cls": 1.0, "loss_box": 2.5},
        ),
        lr=0.1,
        seed="abc",
    )
    # int accepted for float fields is stored as float; tuples become tuples
    assert type(cfg.model.rpn.nms_thresh) is float
    assert type(cfg.model.loss_weights["loss_cls"]) is float
    assert cfg.model.rpn.anchor_sizes == (16, 32) and cfg.model.input_size == (480, 640)
    assert cfg.seed == "abc" and cfg.max_iter == 100 and cfg.flip is True


def test_unknown_key_message_with_file_and_suggestion(in_tmp):
    write(in_tmp, "configs/_base_/m.yaml", "model: {num_classes: 3}\n")
    write(
        in_tmp,
        "configs/faster_rcnn/x.yaml",
        """
        _base_: ../_base_/m.yaml
        model:
          rpn: {nms_thres: 0.5}
    """,
    )
    with pytest.raises(ConfigError) as e:
        load_config("configs/faster_rcnn/x.yaml", Cfg)
    assert str(e.value) == (
        "unknown key 'model.rpn.nms_thres' in configs/faster_rcnn/x.yaml (did you mean 'model.rpn.nms_thresh'?)"
    )


def test_unknown_key_suggestion_from_all_paths_and_no_suggestion(in_tmp):
    write(in_tmp, "x.yaml", "model: {num_classes: 3, nms_thresh: 0.5}\n")
    with pytest.raises(ConfigError) as e:
        load_config("x.yaml", Cfg)
    # nothing close among model's own keys, so the whole schema is searched
    assert str(e.value) == ("unknown key 'model.nms_thresh' in x.yaml (did you mean 'model.rpn.nms_thresh'?)")
    with pytest.raises(ConfigError) as e:
        from_dict(Cfg, {"model": {"num_classes": 3, "rpn": {"nms": 0.5}}})
    # 'model.rpn' itself (an ancestor) is no suggestion; without origins there is no file
    assert str(e.value) == ("unknown key 'model.rpn.nms' in the config (did you mean 'model.rpn.nms_thresh'?)")
    write(in_tmp, "y.yaml", "model: {num_classes: 3}\nzzz: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config("y.yaml", Cfg)
    assert str(e.value) == ("unknown key 'zzz' in y.yaml (valid keys: model, data, lr, max_iter, flip, seed, extra)")


def test_unknown_key_from_command_line(in_tmp):
    write(in_tmp, "x.yaml", "model: {num_classes: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config("x.yaml", Cfg, ["model.polier=roi_pool"])
    assert str(e.value) == ("unknown key 'model.polier' on the command line (did you mean 'model.pooler'?)")


def test_wrong_type_names_key_expected_type_and_file(in_tmp):
    write(in_tmp, "x.yaml", "model: {num_classes: 3, rpn: {nms_thresh: abc}}\n")
    with pytest.raises(ConfigError) as e:
        load_config("x.yaml", Cfg)
    assert str(e.value) == "model.rpn.nms_thresh: expected float, got str 'abc' (in x.yaml)"

    base = {"model": {"num_classes": 3}}
    cases = [
        ({"lr": True}, "lr: expected float, got bool True"),
        ({"max_iter": 1.5}, "max_iter: expected int, got float 1.5"),
        ({"max_iter": False}, "max_iter: expected int, got bool False"),
        ({"flip": 1}, "flip: expected bool, got int 1"),
        ({"flip": "yes"}, "flip: expected bool, got str 'yes'"),
        ({"data": {"name": 5}}, "data.name: expected str, got int 5"),
        ({"data": None}, "data: expected mapping (Data), got null"),
        ({"seed": 1.5}, "seed: expected int or str, got float 1.5"),
        (
            {"model": {"num_classes": 3, "rpn": {"anchor_sizes": [8, "x"]}}},
            "model.rpn.anchor_sizes[1]: expected int, got str 'x'",
        ),
        (
            {"model": {"num_classes": 3, "rpn": {"aspect_ratios": 1.0}}},
            "model.rpn.aspect_ratios: expected list of float, got float 1.0",
        ),
        (
            {"model": {"num_classes": 3, "input_size": [1, 2, 3]}},
            "model.input_size: expected list of 2 items (int, int), got list [1, 2, 3]",
        ),
        (
            {"model": {"num_classes": 3, "loss_weights": {"loss_cls": "a"}}},
            "model.loss_weights.loss_cls: expected float, got str 'a'",
        ),
        ({"model": {"num_classes": 3, "loss_weights": {1: 1.0}}}, "model.loss_weights.1: key expected str, got int 1"),
        ({"model": {"num_classes": 3, "rpn": 4}}, "model.rpn: expected mapping (RPN) or null, got int 4"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError) as e:
            from_dict(Cfg, {**base, **extra})
        assert str(e.value) == message  # no origins given: no "(in ...)"


def test_type_error_origin_is_command_line(in_tmp):
    write(in_tmp, "x.yaml", "model: {num_classes: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config("x.yaml", Cfg, ["max_iter=ten"])
    assert str(e.value) == "max_iter: expected int, got str 'ten' (on the command line)"


def test_literal_lists_allowed_values(in_tmp):
    write(in_tmp, "x.yaml", "model: {num_classes: 3, pooler: roi_alin}\n")
    with pytest.raises(ConfigError) as e:
        load_config("x.yaml", Cfg)
    assert str(e.value) == ("model.pooler: expected one of 'roi_pool', 'roi_align', got str 'roi_alin' (in x.yaml)")


def test_missing_required_key(in_tmp):
    write(in_tmp, "x.yaml", "model: {pooler: roi_pool}\n")
    with pytest.raises(ConfigError) as e:
        load_config("x.yaml", Cfg)
    assert str(e.value) == "missing required key 'model.num_classes' (in x.yaml)"
    write(in_tmp, "y.yaml", "lr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config("y.yaml", Cfg)
    assert str(e.value) == "missing required key 'model' (in y.yaml)"


def test_post_init_value_error_becomes_config_error(in_tmp):
    write(in_tmp, "base.yaml", "model: {num_classes: 3}\n")
    write(in_tmp, "x.yaml", "_base_: base.yaml\nmodel: {num_classes: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_config("x.yaml", Cfg)
    assert str(e.value) == "model: num_classes must be >= 1, got 0 (in x.yaml)"


def test_optional_null_and_defaults(in_tmp):
    write(in_tmp, "x.yaml", "model: {num_classes: 2, rpn: null}\n")
    cfg = load_config("x.yaml", Cfg)
    assert cfg.model.rpn is None
    assert cfg.data == Data() and cfg.model.pooler == "roi_align"


# ----------------------------------------------------------------------------------------
# Path fields
# ----------------------------------------------------------------------------------------


def test_paths_resolve_relative_to_defining_file(in_tmp, monkeypatch):
    monkeypatch.delenv("DK_DATA", raising=False)
    write(
        in_tmp,
        "configs/_base_/datasets/d.yaml",
        """
        data:
          root: ${DK_DATA:../../../../shared/data}/BCCD
          extra_roots: [a, /abs/b, ~/c]
          cache_dir: cache
          name: ../not/a/path
    """,
    )
    write(
        in_tmp,
        "configs/exp/x.yaml",
        """
        _base_: ../_base_/datasets/d.yaml
        model: {num_classes: 3}
    """,
    )
    elsewhere = in_tmp / "somewhere/else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # the cwd must not matter for file-set paths
    cfg = load_config(in_tmp / "configs/exp/x.yaml", Cfg)
    # in_tmp/configs/_base_/datasets + ../../../.. = the parent of in_tmp
    assert cfg.data.root == str(in_tmp.parent / "shared/data/BCCD")
    d = in_tmp / "configs/_base_/datasets"
    assert cfg.data.extra_roots == [str(d / "a"), "/abs/b", os.path.expanduser("~/c")]
    assert cfg.data.cache_dir == str(d / "cache")
    assert cfg.data.name == "../not/a/path"  # a plain str is not a path

    monkeypatch.setenv("DK_DATA", "/mnt/data")
    cfg = load_config(in_tmp / "configs/exp/x.yaml", Cfg)
    assert cfg.data.root == "/mnt/data/BCCD"


def test_override_paths_resolve_relative_to_cwd(in_tmp, monkeypatch):
    write(in_tmp, "configs/x.yaml", "model: {num_classes: 3}\ndata: {root: here}\n")
    work = in_tmp / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(in_tmp / "configs/x.yaml", Cfg, ["data.cache_dir=tmp/cache", "data.extra_roots=[e]"])
    assert cfg.data.root == str(in_tmp / "configs/here")
    assert cfg.data.cache_dir == str(work / "tmp/cache")
    assert cfg.data.extra_roots == [str(work / "e")]


def test_resolve_path_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("a/../b", "/cfg/dir/x.yaml") == "/cfg/dir/b"
    assert resolve_path("/abs//p/", "/cfg/dir/x.yaml") == "/abs/p"
    assert resolve_path("p", COMMAND_LINE) == str(tmp_path / "p")
    assert resolve_path("p", None) == str(tmp_path / "p")
    assert resolve_path("", "/cfg/x.yaml") == ""


def test_path_type_errors(in_tmp):
    write(in_tmp, "x.yaml", "model: {num_classes: 3}\ndata: {root: 5}\n")
    with pytest.raises(ConfigError) as e:
        load_config("x.yaml", Cfg)
    assert str(e.value) == "data.root: expected path, got int 5 (in x.yaml)"


# ----------------------------------------------------------------------------------------
# Writing and the round trip
# ----------------------------------------------------------------------------------------


def test_to_dict_plain_types_in_schema_order():
    cfg = Cfg(model=Model(num_classes=2, rpn=None), data=Data(root="/r"))
    assert to_dict(cfg) == {
        "model": {"num_classes": 2, "pooler": "roi_align", "rpn": None, "input_size": [600, 1000], "loss_weights": {}},
        "data": {"root": "/r", "extra_roots": [], "cache_dir": None, "name": "bccd"},
        "lr": 0.01,
        "max_iter": 100,
        "flip": True,
        "seed": 0,
        "extra": None,
    }
    assert list(to_dict(cfg)) == ["model", "data", "lr", "max_iter", "flip", "seed", "extra"]


def test_dump_load_round_trip(in_tmp, monkeypatch):
    monkeypatch.setenv("DK_A", "alpha")
    write(
        in_tmp,
        "configs/base.yaml",
        """
        model:
          num_classes: 3
          rpn: {nms_thresh: 0.65, anchor_sizes: [8]}
          loss_weights: {loss_cls: 1e-3}
        data: {root: ../data, extra_roots: [x], name: "1e-3"}
        seed: "yes"
        extra: {note: "$${LITERAL} and ${DK_A}", when: 1:30}
    """,
    )
    cfg = load_config("configs/base.yaml", Cfg, ["lr=0.25", "data.cache_dir=c"])
    assert cfg.extra == {"note": "${LITERAL} and alpha", "when": "1:30"}
    assert cfg.data.name == "1e-3" and cfg.seed == "yes"
    out = in_tmp / "out/run/config.yaml"
    dump_config(cfg, out)
    text = out.read_text(encoding="utf-8")
    # strings that look like other types are quoted; floats are written so they read back
    assert "name: '1e-3'" in text and "seed: 'yes'" in text and "loss_cls: 0.001" in text
    monkeypatch.delenv("DK_A")
    monkeypatch.chdir(in_tmp / "out")  # a different cwd must not change resolved paths
    again = load_config(out, Cfg)
    assert again == cfg
    assert again.data.root == str(in_tmp / "data")
    assert again.data.cache_dir == str(in_tmp / "c")
    # the dump is plain YAML that any safe loader reads
    assert yaml.safe_load(text)["model"]["rpn"]["anchor_sizes"] == [8]


def test_config_error_is_one_line_value_error():
    err = ConfigError("a\nb\n  c")
    assert isinstance(err, ValueError) and str(err) == "a b c"
