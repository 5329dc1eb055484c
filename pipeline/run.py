"""Thin CLI: ``python -m pipeline.run STAGE [CONFIG.yaml] [key=value ...]``.

Parses the stage, an optional YAML config and ``key=value`` overrides into the stage's typed
config, then calls one stage function. ``ingest`` also takes ``SOURCE`` positionally and
``--out``/``--labels`` flags. ``sync OUTBOX [uri=URI]`` sends the MLflow calls a run buffered on
disk while its tracking server was unreachable.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.config import ConfigError, load_config

# stage -> (module, config dataclass, stage function) for the stages taking only key=value overrides
KEYVALUE_STAGES = {
    "train": ("pipeline.train", "TrainConfig", "train"),
    "generate": ("pipeline.generate", "GenerateConfig", "generate"),
    "classify": ("pipeline.classify", "ClassifyConfig", "classify"),
    "evaluate": ("pipeline.evaluate", "EvaluateConfig", "evaluate"),
    "gain": ("pipeline.gain", "GainConfig", "gain"),
}
STAGES = ("ingest", "compare", "sync", *KEYVALUE_STAGES)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--out", help="ingest: output manifest CSV (default data_manifests/<source>.csv)")
    parser.add_argument("--labels", help="ingest: CSV of path,label for a folder without class sub-folders")
    parser.add_argument("rest", nargs="*", help="[CONFIG.yaml] [key=value ...] (ingest: SOURCE first)")
    args = parser.parse_args(argv)
    try:
        yaml_path, overrides, positional = _split_args(args.rest)
        if args.stage == "ingest":
            from pipeline.ingest import IngestConfig, ingest

            if len(positional) > 1:
                raise ConfigError(f"ingest takes one SOURCE, got {positional}")
            if positional:
                overrides.insert(0, f"source={positional[0]}")
            if args.out:
                overrides.append(f"out={args.out}")
            if args.labels:
                overrides.append(f"labels={args.labels}")
            ingest(load_config(IngestConfig, yaml_path, overrides))
            return 0
        if args.stage == "compare":
            from pipeline.compare import CompareConfig, compare

            # compare [EXPERIMENT] [FILTER]: a filter string is free text (it may hold '=')
            raw = [a for a in args.rest if not a.endswith((".yaml", ".yml"))]
            own = [a for a in raw if a.split("=", 1)[0] in CompareConfig.__dataclass_fields__]
            free = [a for a in raw if a not in own]
            if free:
                own.insert(0, f"experiment={free[0]}")
            if len(free) > 1:
                own.append("filter=" + " ".join(free[1:]))
            return compare(load_config(CompareConfig, yaml_path, [_quote(o) for o in own]))
        if args.stage == "sync":
            from pipeline.tracking import sync

            extra = [o for o in overrides if not o.startswith("uri=")]
            if len(positional) != 1 or extra:
                raise ConfigError("usage: python -m pipeline.run sync OUTBOX_FOLDER [uri=TRACKING_URI]")
            uri = next((o.split("=", 1)[1] for o in overrides if o.startswith("uri=")), "")
            return 0 if sync(positional[0], uri)["pending"] == 0 else 1
        if positional:
            raise ConfigError(f"unexpected argument(s) {positional}: use key=value overrides")
        # the remaining stages differ only in which config class and function they use
        module_name, cls_name, fn_name = KEYVALUE_STAGES[args.stage]
        module = importlib.import_module(module_name)
        getattr(module, fn_name)(load_config(getattr(module, cls_name), yaml_path, overrides))
        return 0
    except (
        ConfigError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
        ValueError,
        LookupError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
