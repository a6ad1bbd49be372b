"""The stages' command line, one place: the parser, one flag per config key, and the entry point.

Every stage ends in `sys.exit(run_stage(...))`: parse the flags, load the config, set up logging,
call the stage's importable `run(cfg, ...)`, and turn a problem the user can fix into one sentence
and exit status 1 (the traceback goes to logs/<stage>.jsonl, never to the terminal).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from dataclasses import fields

from common.config import Config, ConfigError, UserError, load_config, parse_text
from common.logs import quiet_libraries, setup_logging


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """A stage's parser: its module docstring (with the example commands) is the --help text."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_config_args(parser: argparse.ArgumentParser, section: str | None = None,
                    model_help: str | None = None) -> None:
    """--config, --profile, --set, one flag per key of the stage's own section, and --model
    (-> model.path) when the stage reads a model and `model_help` says what for.

    The flags default to None ("not given"), so config.yaml stays the single source of defaults;
    --help shows the value config.yaml gives each of them.
    """
    parser.add_argument("--config", help="config file to read (default: config.yaml, or $QWEN_CONFIG)")
    parser.add_argument("--profile", help="overlay from config.yaml's profiles ('none' for the plain values)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key, e.g. --set serve.port=9000 (repeatable)")
    if model_help:
        parser.add_argument("--model", dest="cfg_model_path", metavar="DIR", help=f"{model_help} (default: model.path)")
    if section is None:
        return
    try:
        current = getattr(load_config(use_env=False), section)
    except ConfigError:  # --help must work even when config.yaml is broken; the run will say why
        current = None
    section_cls = typing.get_type_hints(Config)[section]
    for f in fields(section_cls):
        tp = typing.get_type_hints(section_cls)[f.name]
        shown = getattr(current, f.name) if current is not None else "?"
        kwargs = dict(dest=f"cfg__{f.name}", default=None, help=f"default {section}.{f.name}: {shown!r}",
                      metavar=None if tp is bool else f.name.upper())
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = str  # converted and checked with the config's own types
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def add_force(parser: argparse.ArgumentParser, what: str = "output directory") -> None:
    """--force, the one definition: the stages that write a directory refuse to replace one without it."""
    parser.add_argument("--force", action="store_true", help=f"replace an existing {what}")


def config_from_args(args: argparse.Namespace, section: str | None = None) -> Config:
    """Load the config with the overrides the command line gave."""
    overrides: dict[str, object] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, got '{item}'")
        overrides[key.strip()] = parse_text(key.strip(), value)
    if getattr(args, "cfg_model_path", None):
        overrides["model.path"] = args.cfg_model_path
    for name, value in vars(args).items():
        if name.startswith("cfg__") and value is not None:
            dotted = f"{section}.{name[5:]}"
            overrides[dotted] = parse_text(dotted, value) if isinstance(value, str) else value
    return load_config(args.config, args.profile, overrides)


def run_stage(name: str, doc: str | None, run, *, section: str | None = None, model_help: str | None = None,
              add_args=None, report=None, argv=None) -> int:
    """The one stage entry point: `run(cfg, args)` does the work, `report(result)` prints it and may
    return an exit status. A UserError, or a file that cannot be read or written (OSError, bad JSON),
    is one line on stderr and exit 1; Ctrl-C is exit 130."""
    quiet_libraries()  # a stage that imports torch at its top has called it already, before that import
    parser = stage_parser(doc)
    if add_args is not None:
        add_args(parser)
    add_config_args(parser, section, model_help)
    args = parser.parse_args(argv)
    log = logging.getLogger(name)
    try:
        cfg = config_from_args(args, section)
        setup_logging(name, cfg.resolve(cfg.logging.dir), cfg.logging.level)
        result = run(cfg, args)
    except (UserError, OSError, json.JSONDecodeError) as e:
        log.debug("stopped: %s", e, exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    status = report(result) if report is not None else None
    return int(status or 0)
