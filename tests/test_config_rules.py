"""Numbers and YAML refused by rule, whatever the stage (issue 24 a, b): every float key finite,
every declared range enforced, YAML anchors and aliases refused, long values cut in messages."""

from __future__ import annotations

import dataclasses
import math
import re
import time
import typing

import pytest

import pipeline.run
from pipeline.infra.config import (
    MAX_MESSAGE,
    ConfigError,
    declared_ranges,
    format_help,
    in_interval,
    load_config,
    parse_interval,
)
from pipeline.infra.stage_configs import TrainConfig
from pipeline.ingest.config import IngestConfig
from pipeline.run import CONFIG_STAGES, main

# the keys a stage requires, so that its config can be built at all
REQUIRED = {
    "generate": ["checkpoint=g.pt"],
    "evaluate": ["checkpoint=g.pt", "judge=c.pt"],
    "report": ["records=r"],
}


def _sections(cls: type, prefix: str = ""):
    """(dotted prefix, dataclass) for ``cls`` and every section below it."""
    yield prefix, cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from _sections(tp, f"{prefix}{f.name}.")


def _numeric(tp) -> type | None:
    """int or float for a numeric field (or a list of them), else None."""
    if typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    return tp if tp in (int, float) else None


def _float_keys() -> list[tuple[str, str]]:
    keys = []
    for stage, (cls, _, _) in CONFIG_STAGES.items():
        for prefix, section in _sections(cls):
            hints = typing.get_type_hints(section)
            keys += [
                (stage, f"{prefix}{f.name}") for f in dataclasses.fields(section) if hints[f.name] is float
            ]
    return keys


def _ranged_keys() -> list[tuple[str, str, str]]:
    keys = []
    for stage, (cls, _, _) in CONFIG_STAGES.items():
        for prefix, section in _sections(cls):
            keys += [(stage, f"{prefix}{k}", spec) for k, spec in declared_ranges(section).items()]
    return keys


def test_the_rule_covers_many_keys():
    # a refactor that lost the float rule or the RANGES tables would make the tests below vacuous
    assert len(_float_keys()) > 40 and len(_ranged_keys()) > 30


@pytest.mark.parametrize(
    "cls", sorted({s for c, _, _ in CONFIG_STAGES.values() for _, s in _sections(c)}, key=str)
)
def test_every_declared_range_parses_names_a_numeric_field_and_holds_its_default(cls):
    # a range on a misspelt key, or one its own default breaks, would never be enforced or would
    # refuse the stage's defaults the first time someone sets the key to its default
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, spec in declared_ranges(cls).items():
        assert key in fields and _numeric(hints[key]), (cls.__name__, key)
        parse_interval(spec)
        f = fields[key]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        for v in default if isinstance(default, list) else [default]:
            assert in_interval(v, spec), (cls.__name__, key, v, spec)


@pytest.mark.parametrize("stage,key", _float_keys())
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan"])
def test_every_float_key_refuses_nan_and_inf(stage, key, value):
    # nan and inf never mean anything in a config: nan passes every `x < 0` check (grad_clip=nan
    # silently switched clipping off) and inf ends in a traceback deep in the stage
    cls = CONFIG_STAGES[stage][0]
    with pytest.raises(ConfigError, match=f"'{key}': .* is not a finite number"):
        load_config(cls, None, [*REQUIRED.get(stage, []), f"{key}={value}"])


@pytest.mark.parametrize("stage,key,spec", _ranged_keys())
def test_every_declared_range_refuses_a_value_outside_it(stage, key, spec):
    # a value refused only by the range: just past its upper bound when it has one, else its lower
    # (every declared bound is a whole number, so the value fits int and float keys alike)
    lo, hi, lo_open, hi_open = parse_interval(spec)
    bad = (hi if hi_open else hi + 1) if math.isfinite(hi) else (lo if lo_open else lo - 1)
    assert bad == int(bad), spec
    cls = CONFIG_STAGES[stage][0]
    listed = key.endswith(("labels", "widths"))  # list keys: the range holds for each element
    value, where = (f"[{int(bad)}]", f"{key}[0]") if listed else (str(int(bad)), key)
    with pytest.raises(ConfigError, match=rf"'{re.escape(where)}' must be in {re.escape(spec)}"):
        load_config(cls, None, [*REQUIRED.get(stage, []), f"{key}={value}"])


def test_a_huge_learning_rate_is_refused_as_not_finite():
    # optim.lr=inf was accepted and trained on NaN weights
    with pytest.raises(ConfigError, match="'optim.lr': inf is not a finite number"):
        load_config(TrainConfig, None, ["optim.lr=inf"])


def test_nan_kl_weight_is_refused():
    # nan passes no comparison, so no `< 0` check ever caught it
    with pytest.raises(ConfigError, match="'loss.kl_weight': nan is not a finite number"):
        load_config(TrainConfig, None, ["loss.kl_weight=nan"])


def test_a_negative_loss_weight_is_refused():
    # kl_weight=-50 rewarded the KL term instead of penalising it
    with pytest.raises(ConfigError, match=r"'loss.kl_weight' must be in \[0, inf\), got -50"):
        load_config(TrainConfig, None, ["loss.kl_weight=-50"])


def test_nan_grad_clip_is_refused():
    # grad_clip=nan passed `grad_clip < 0` and silently switched clipping off
    with pytest.raises(ConfigError, match="'optim.grad_clip': nan is not a finite number"):
        load_config(TrainConfig, None, ["optim.grad_clip=nan"])


def test_an_infinite_memory_budget_is_refused():
    # decode_memory_mb=inf ended in a traceback when ingest sized its decoding threads
    with pytest.raises(ConfigError, match="'decode_memory_mb': inf is not a finite number"):
        load_config(IngestConfig, None, ["decode_memory_mb=inf"])


def test_a_billion_classes_are_refused():
    # model.num_classes=10^9 ended in a traceback allocating the class embedding
    with pytest.raises(ConfigError, match=r"'model.num_classes' must be in \[0, 1000\]"):
        load_config(TrainConfig, None, ["model.num_classes=1000000000"])


def test_an_int_beyond_64_bits_is_refused():
    # torch and numpy cannot hold it: an OverflowError traceback at seeding
    with pytest.raises(ConfigError, match="'seed': .* does not fit a 64-bit integer"):
        load_config(TrainConfig, None, ["seed=" + "9" * 30])


def test_an_int_beyond_any_float_is_refused_for_a_float_key():
    # float(10**400) raises OverflowError: it is as infinite as inf
    with pytest.raises(ConfigError, match="'optim.lr': .* is not a finite number"):
        load_config(TrainConfig, None, ["optim.lr=1" + "0" * 400])


def test_a_range_applies_to_every_list_element():
    # data.labels=[0, -1] would select the quarantined label
    with pytest.raises(ConfigError, match=r"'data.labels\[1\]' must be in \[0, 999\], got -1"):
        load_config(TrainConfig, None, ["data.labels=[0, -1]"])


def test_a_range_is_checked_in_a_config_file_too(tmp_path):
    # the file's values go through the same rule as the overrides, and the message names the file
    y = tmp_path / "c.yaml"
    y.write_text("loss:\n  adversarial: -1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: config key 'loss.adversarial' must be in \[0, inf\)"):
        load_config(TrainConfig, y)


def test_help_shows_the_declared_range():
    line = next(ln for ln in format_help(TrainConfig).splitlines() if ln.split()[0] == "model.num_classes")
    assert "(range [0, 1000])" in line


def test_negative_num_classes_is_a_config_error_before_the_stage_runs(capsys, monkeypatch):
    # model.num_classes=-1 used to pass the config check and fail only once train had generated
    # the default phantom data set; now the stage (and its data) is never reached
    monkeypatch.setattr(pipeline.run, "stage_function", lambda stage: pytest.fail(f"{stage} ran"))
    assert main(["train", "model.num_classes=-1"]) == 2
    err = capsys.readouterr().err
    assert "'model.num_classes' must be in [0, 1000], got -1" in err


# ----------------------------------------------------------------------------------------- YAML
BOMB = "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_a_yaml_alias_bomb_in_a_config_file_is_refused_at_once(tmp_path):
    # a few hundred bytes expanding to 9^9 strings got the loader OOM-killed
    y = tmp_path / "bomb.yaml"
    y.write_text(BOMB)
    assert len(BOMB) < 400
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="bomb.yaml: invalid YAML at line 1, .*anchors and aliases"):
        load_config(TrainConfig, y)
    assert time.perf_counter() - t0 < 5


def test_a_yaml_alias_in_an_override_is_refused():
    # key=value values are YAML too: the same bomb fits on a command line
    with pytest.raises(ConfigError, match="override 'data.labels=.*anchors and aliases"):
        load_config(TrainConfig, None, ["data.labels=[&a [1, 1], *a]"])


def test_a_yaml_anchor_alone_is_refused(tmp_path):
    # an anchor is only there to be aliased: refused where it is defined, with its line
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 3\nloss: &w\n  gamma: 1.0\n")
    with pytest.raises(ConfigError, match="at line 2, column 7: YAML anchors and aliases"):
        load_config(TrainConfig, y)


def test_a_long_value_is_cut_in_a_type_error():
    # a 378-byte alias bomb printed a 322 MB error line; a long value is cut, its length said
    with pytest.raises(ConfigError, match=r"\.\.\. \(10002 chars\)") as e:
        load_config(TrainConfig, None, ["epochs=" + "x" * 10000])
    assert len(str(e.value)) < 400


def test_a_long_value_is_cut_in_a_section_check_message():
    # __post_init__ messages echo the value (model.kind=...): the whole message is cut
    with pytest.raises(ConfigError, match=r"model.kind.*\.\.\. \(\d+ chars\)") as e:
        load_config(TrainConfig, None, ["model.kind=" + "y" * 10000])
    assert len(str(e.value)) < MAX_MESSAGE + 100


def test_a_long_unknown_key_is_cut():
    # the key is echoed too (and no spelling is searched for: difflib is quadratic in its length)
    with pytest.raises(ConfigError, match=r"unknown config key .*\.\.\. \(\d+ chars\)") as e:
        load_config(TrainConfig, None, ["k" * 100000 + "=1"])
    assert len(str(e.value)) < 400


def test_a_long_override_without_equals_is_cut():
    # the whole item is echoed when it is not key=value
    with pytest.raises(ConfigError, match=r"is not of the form key=value") as e:
        load_config(TrainConfig, None, ["z" * 10000])
    assert len(str(e.value)) < 400
