"""Thin CLI: ``python -m pipeline.run STAGE [CONFIG.yaml] [key=value ...]``.

Parses the stage, an optional YAML config and ``key=value`` overrides into the stage's typed
config, then calls one stage function. ``ingest`` also takes ``SOURCE`` positionally and
``--out``/``--labels`` flags. ``sync OUTBOX [uri=URI]`` sends the MLflow calls a run buffered on
disk while its tracking server was unreachable. ``STAGE --help`` lists every key of the stage's
config (type, this stage's default, meaning); ``--print-config`` prints the resolved config as
YAML (which loads back as a config file) and exits.

The config classes come from :mod:`pipeline.infra.stage_configs`, which imports neither torch, MONAI nor
MLflow: the config is loaded and checked (and ``--help``/``--print-config`` answered) in about a
second, and only then is the stage's module imported and its function called.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from pathlib import Path

from pipeline.infra.config import (
    EXIT_BUDGET,
    BudgetReached,
    ConfigError,
    all_keys,
    format_help,
    load_config,
    to_yaml,
)
from pipeline.infra.stage_configs import (
    ClassifyConfig,
    EvaluateConfig,
    ExportConfig,
    GenerateConfig,
    TrainConfig,
)
from pipeline.infra.study_configs import CompareConfig, GainConfig, ReportConfig
from pipeline.ingest.config import IngestConfig

# stage -> (config dataclass, module, stage function) for the stages taking only key=value overrides;
# the module (torch, MONAI, MLflow ...) is imported only once the config is loaded and valid
KEYVALUE_STAGES = {
    "train": (TrainConfig, "pipeline.train", "train"),
    "generate": (GenerateConfig, "pipeline.generate", "generate"),
    "classify": (ClassifyConfig, "pipeline.classify", "classify"),
    "evaluate": (EvaluateConfig, "pipeline.evaluate", "evaluate"),
    "gain": (GainConfig, "pipeline.gain", "gain"),
    "report": (ReportConfig, "pipeline.report", "report"),
    "export": (ExportConfig, "pipeline.export", "export"),
}
# every stage with a config: the key=value ones, plus ingest and compare
CONFIG_STAGES = {
    **KEYVALUE_STAGES,
    "ingest": (IngestConfig, "pipeline.ingest.stage", "ingest"),
    "compare": (CompareConfig, "pipeline.compare", "compare"),
}
STAGES = ("ingest", "compare", "sync", *KEYVALUE_STAGES)

USAGE = {
    "ingest": "ingest SOURCE [CONFIG.yaml] [--out CSV] [--labels CSV] [key=value ...]",
    "compare": "compare [EXPERIMENT] [FILTER ...] [CONFIG.yaml] [key=value ...]",
    "sync": "sync OUTBOX_FOLDER [uri=TRACKING_URI]",
}
# the config file a stage reads when none is given: `python -m pipeline.run train` alone trains the
# default job (the class-conditioned VAE-GAN on the embedded phantoms); `model.num_classes=0` (or
# another config file) is the unconditioned model
DEFAULT_CONFIGS = {"train": Path(__file__).resolve().parent / "configs" / "phantoms64.yaml"}
FLAG_OPTIONS = {"ingest": ("--out", "--labels")}  # stage -> the flags taking a value it accepts


def config_class(stage: str) -> type:
    """The config dataclass of ``stage`` (from pipeline.infra.stage_configs: nothing heavy is imported)."""
    return CONFIG_STAGES[stage][0]


# `sync` has no config: it replays a run's buffered MLflow calls
SYNC_FUNCTION = ("pipeline.infra.tracking", "sync")


def stage_function(stage: str):
    """The function running ``stage``: imports its module, and with it torch, MONAI, MLflow ..."""
    module_name, fn_name = SYNC_FUNCTION if stage == "sync" else CONFIG_STAGES[stage][1:]
    return getattr(importlib.import_module(module_name), fn_name)


def _summary(stage: str) -> str:
    """The first line of the stage function's docstring, read from its source without importing it."""
    _, module_name, fn_name = CONFIG_STAGES[stage]
    try:
        spec = importlib.util.find_spec(module_name)
        if spec is None or not spec.origin:
            return ""
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read(), spec.origin)
    except (OSError, SyntaxError, ValueError, ImportError):
        return ""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == fn_name:
            doc = (ast.get_docstring(node) or "").strip().splitlines()
            return doc[0] if doc else ""
    return ""


def _split_args(rest: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Separate the YAML file, ``key=value`` overrides and other positionals."""
    yaml_path, overrides, positional = None, [], []
    for a in rest:
        if a.endswith((".yaml", ".yml")) and "=" not in a:
            if yaml_path is not None:
                raise ConfigError(f"two config files given: {yaml_path} and {a}")
            yaml_path = a
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            positional.append(a)
    return yaml_path, overrides, positional


def _quote(item: str) -> str:
    """Keep free-text values (experiment names, filters) strings rather than YAML scalars."""
    key, value = item.split("=", 1)
    return f"{key}={value}" if value.startswith(("'", '"')) else f"{key}='" + value.replace("'", "''") + "'"


def _flag_hint(stage: str, flag: str, value: str | None) -> str:
    """``--epochs 1`` -> 'write epochs=1', naming the dotted key when the name is a leaf of one."""
    name = flag.lstrip("-").replace("-", "_")
    if stage in CONFIG_STAGES:
        keys = all_keys(config_class(stage))
        if name not in keys:
            owners = [k for k in keys if k.rsplit(".", 1)[-1] == name]
            if len(owners) == 1:
                name = owners[0]
    shown = value if value is not None else "VALUE"
    return f"unknown option '{flag}': config keys are set as key=value, write {name}={shown}"


def _parse_stage_args(stage: str, argv: list[str]) -> tuple[dict[str, str], list[str], bool, bool]:
    """Flags (the stage's own, e.g. ingest's --out), the remaining words, --help, --print-config.

    Flags and ``key=value`` words may come in any order; an unknown ``--name [value]`` is an error
    whose message shows the ``name=value`` to write instead.
    """
    allowed = FLAG_OPTIONS.get(stage, ())
    flags: dict[str, str] = {}
    words: list[str] = []
    show_help = print_config = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            show_help = True
        elif a == "--print-config":
            print_config = True
        elif a == "--":  # everything after is a plain word
            words.extend(argv[i + 1 :])
            break
        elif a.startswith("--") and len(a) > 2:
            name, eq, value = a.partition("=")
            if name in allowed:
                if not eq:
                    if i + 1 >= len(argv):
                        raise ConfigError(f"{name} needs a value")
                    i += 1
                    value = argv[i]
                flags[name.lstrip("-")] = value
            else:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if eq:
                    nxt = value
                elif nxt is not None and ((nxt.startswith("-") and not _is_number(nxt)) or "=" in nxt):
                    nxt = None
                raise ConfigError(_flag_hint(stage, name, nxt))
        elif a.startswith("-") and len(a) > 1 and not _is_number(a):
            raise ConfigError(_flag_hint(stage, a, None))
        else:
            words.append(a)
        i += 1
    return flags, words, show_help, print_config


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _stage_help(stage: str) -> str:
    usage = USAGE.get(stage, f"{stage} [CONFIG.yaml] [key=value ...]")
    if stage == "sync":
        return (
            f"usage: python -m pipeline.run {usage}"
            + "\n\nSends the MLflow calls a run buffered on disk while its tracking server was unreachable."
        )
    lines = [f"usage: python -m pipeline.run {usage} [--print-config]"]
    if stage in DEFAULT_CONFIGS:
        lines.append(
            f"with no CONFIG.yaml: {DEFAULT_CONFIGS[stage].name} (the default job; its values override "
            "the defaults listed below)"
        )
    cls = config_class(stage)
    summary = _summary(stage)
    if summary:
        lines += ["", summary]
    lines += [
        "",
        "--print-config   print the resolved config as YAML (a valid CONFIG.yaml) and exit",
        "",
        f"keys ({cls.__name__}; KEY  TYPE  DEFAULT OF THIS STAGE  MEANING), set as key=value "
        "(YAML values; none = null; lists as [a,b]) or in CONFIG.yaml:",
        format_help(cls),
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.run",
        description=__doc__.splitlines()[0],
        epilog="python -m pipeline.run STAGE --help lists every key of that stage's config; "
        f"ingest: {USAGE['ingest']}; compare: {USAGE['compare']}; sync: {USAGE['sync']}",
    )
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument(
        "rest", nargs="*", default=[], help="[CONFIG.yaml] [key=value ...] (ingest: SOURCE first)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        _parser().parse_args(argv[:1])  # prints the usage or the error (and exits)
        return 2
    try:
        return _run_stage(argv[0], argv[1:])
    except (
        ConfigError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
        ValueError,
        LookupError,
        OSError,  # disk full (checkpoint.DiskFullError), unreadable files: one line, not a traceback
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BudgetReached as e:  # a study stopped at its time budget: the same command continues it
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_BUDGET


def _run_stage(stage: str, args: list[str]) -> int:
    """Run ``stage`` with its command-line arguments (help, ``--print-config`` or the stage itself)."""
    flags, rest, show_help, print_config = _parse_stage_args(stage, args)
    if show_help:
        print(_stage_help(stage))
        return 0
    yaml_path, overrides, positional = _split_args(rest)
    if yaml_path is None and stage in DEFAULT_CONFIGS:
        yaml_path = str(DEFAULT_CONFIGS[stage])  # the default job: what `make run` trains
    if stage == "sync":
        return _sync(overrides, positional, print_config)
    if stage == "ingest":
        overrides = _ingest_overrides(overrides, positional, flags)
    elif stage == "compare":
        overrides = _compare_overrides(rest)
    elif positional:
        raise ConfigError(f"unexpected argument(s) {positional}: use key=value overrides")
    # the stages differ only in which config class and function they use
    cfg = load_config(config_class(stage), yaml_path, overrides)
    if print_config:
        print(to_yaml(cfg), end="")
        return 0
    result = stage_function(stage)(cfg)
    return result if stage == "compare" else 0  # compare's exit status: 0, or why it showed nothing


def _ingest_overrides(overrides: list[str], positional: list[str], flags: dict[str, str]) -> list[str]:
    """ingest SOURCE [--out CSV] [--labels CSV]: the source and the flags as overrides."""
    if len(positional) > 1:
        raise ConfigError(f"ingest takes one SOURCE, got {positional}")
    source = [_quote(f"source={positional[0]}")] if positional else []
    return (
        source + overrides + [_quote(f"{name}={flags[name]}") for name in ("out", "labels") if name in flags]
    )


def _compare_overrides(rest: list[str]) -> list[str]:
    """compare [EXPERIMENT] [FILTER]: a filter string is free text (it may hold '=')."""
    cls = config_class("compare")
    keys = {*cls.__dataclass_fields__, *cls.RENAMED}  # a key=value, or a section's (tracking.uri=)
    raw = [a for a in rest if not a.endswith((".yaml", ".yml"))]
    own = [a for a in raw if "=" in a and a.split("=", 1)[0].split(".")[0] in keys]
    free = [a for a in raw if a not in own]
    if free:
        own.insert(0, f"tracking.experiment={free[0]}")
    if len(free) > 1:
        own.append("filter=" + " ".join(free[1:]))
    return [_quote(o) for o in own]


def _sync(overrides: list[str], positional: list[str], print_config: bool) -> int:
    """sync OUTBOX [uri=URI]: 0 when everything was sent, 1 when some of it is still pending."""
    extra = [o for o in overrides if not o.startswith("uri=")]
    if len(positional) != 1 or extra or print_config:
        raise ConfigError(f"usage: python -m pipeline.run {USAGE['sync']}")
    uri = next((o.split("=", 1)[1] for o in overrides if o.startswith("uri=")), "")
    return 0 if stage_function("sync")(positional[0], uri)["pending"] == 0 else 1


def cli() -> None:
    """The ``cxr-vaegan`` console script: ``cxr-vaegan train ...`` equals ``python -m pipeline.run train ...``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
