"""The configuration: built-in defaults, then the INI file, then the flags."""
from __future__ import annotations

import argparse
import configparser
import dataclasses
from typing import Any, Sequence

from .address import Address
from .errors import ConfigError
from .settings import SETTINGS, Config, Setting

__all__ = ["Config", "build_parser", "defaults", "describe", "load", "read_file", "reload"]


def build_parser(prog: str = "dnsrouter", settings: Sequence[Setting] = SETTINGS,
                 description: str = "Route DNS queries to the authoritative backend whose regexp "
                                    "matches the name.") -> argparse.ArgumentParser:
    """Flags for the settings that have one, ``--config``, ``--check-config`` and ``--version``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE", help="INI configuration file")
    for setting in settings:
        if setting.flag is None:
            continue
        kwargs: dict[str, Any] = {"dest": setting.name, "metavar": setting.metavar, "help": f"{setting.help} "
                                  f"({setting.label}, default {setting.default or 'none'})"}
        if setting.name == "server_listen":
            kwargs["action"] = "append"
        elif setting.parse.__name__ == "_bool":  # a switch: --allow-root means yes
            kwargs.update(action="store_const", const="yes")
            del kwargs["metavar"]
        parser.add_argument(setting.flag, **kwargs)
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, print it, exit 0 (or 2 with the reason)")
    parser.add_argument("--version", action="store_true",
                        help="print the version and whether the compiled UDP path is in use (if not, why), exit 0")
    return parser


def _uncomment(line: str) -> str:
    return line.split("#", 1)[0].split(";", 1)[0].strip()


def _locate(lines: list[str], section: str, key: str) -> int:
    """The line of ``key`` in ``[section]``, for messages (configparser has none)."""
    current = None
    for number, line in enumerate(lines, 1):
        text = _uncomment(line)
        if text.startswith("[") and text.endswith("]"):
            current = text[1:-1].strip()
        elif current == section and text.split("=", 1)[0].split(":", 1)[0].strip().lower() == key:
            return number
    return 0


def read_file(path: str, settings: Sequence[Setting] = SETTINGS,
              repeated: dict[str, Sequence[Setting]] | None = None) -> dict[str, str]:
    """Raw values by setting name; unknown sections and keys are errors.

    ``repeated`` declares sections written ``[NAME K]`` (K = 0, 1, ...), each
    with the same keys: their values come back keyed ``NAME K/key``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    parser = configparser.ConfigParser(interpolation=None, strict=True,
                                       inline_comment_prefixes=("#", ";"), default_section="\0")
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        raise ConfigError(f"{path}: {e}".replace("\n", " ")) from None
    lines = text.splitlines()
    repeated = repeated or {}
    plain = {s.section for s in settings}
    values: dict[str, str] = {}
    for section in parser.sections():
        kind, _, number = section.partition(" ")
        if kind in repeated and number.isdigit():
            declared, prefix = repeated[kind], f"{kind} {int(number)}/"
        elif section in plain:
            declared, prefix = [s for s in settings if s.section == section], ""
        else:
            line = next((n for n, text in enumerate(lines, 1) if _uncomment(text) == f"[{section}]"), 0)
            expected = "".join(f" (or [{name} K], K = 0, 1, ...)" for name in repeated)
            raise ConfigError(f"{path}:{line}: unknown section [{section}]{expected}")
        for key, value in parser.items(section):
            setting = next((s for s in declared if s.key == key), None)
            if setting is None:
                raise ConfigError(f"{path}:{_locate(lines, section, key)}: "
                                  f"unknown key {key!r} in [{section}]")
            values[prefix + key if prefix else setting.name] = value
            try:
                setting.parse(value)
            except ValueError as e:
                raise ConfigError(f"{path}:{_locate(lines, section, key)}: "
                                  f"[{section}] {key}: {e}") from None
    return values


def _parse(setting: Setting, raw: str, where: str) -> Any:
    try:
        return setting.parse(raw)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def load(args: argparse.Namespace) -> Config:
    """Build the Config from parsed flags and the file they name."""
    from_file = read_file(args.config) if args.config else {}
    return Config(config_file=args.config, **parse_all(args, SETTINGS, from_file))


def defaults(**changes: Any) -> Config:
    """The built-in defaults with ``changes`` (parsed values, by setting name):
    a Config with no file or flags behind it, for a part built on its own."""
    config = Config(config_file=None, **parse_all(argparse.Namespace(), SETTINGS, {}))
    return dataclasses.replace(config, **changes)


def parse_all(args: argparse.Namespace, settings: Sequence[Setting], from_file: dict[str, str]) -> dict[str, Any]:
    """Each setting's value by name: its flag, else the file's, else the default."""
    values: dict[str, Any] = {}
    for setting in settings:
        flag = getattr(args, setting.name, None) if setting.flag else None
        if flag is not None:
            raw = " ".join(flag) if isinstance(flag, list) else flag
            values[setting.name] = _parse(setting, raw, setting.flag or setting.name)
        elif setting.name in from_file:
            values[setting.name] = setting.parse(from_file[setting.name])
        else:
            values[setting.name] = _parse(setting, setting.default, setting.label)
    return values


def reload(config: Config, args: argparse.Namespace) -> tuple[Config, list[str], list[str]]:
    """Re-read the file (SIGHUP): the new config, names applied, names needing a restart.

    Flags still win over the file, as at start.
    """
    new = load(args)
    applied: list[str] = []
    restart: list[str] = []
    for setting in SETTINGS:
        if getattr(new, setting.name) != getattr(config, setting.name):
            (applied if setting.live else restart).append(setting.label)
    # Keep the old values of what cannot change live, so the running state stays true.
    kept = {s.name: getattr(config if not s.live else new, s.name) for s in SETTINGS}
    return Config(config_file=config.config_file, **kept), applied, restart


def describe(config: Any, settings: Sequence[Setting] = SETTINGS, section_names: dict[str, str] | None = None) -> str:
    """The effective configuration as an INI file (``--check-config``).

    ``section_names`` writes a section under another name (``shard`` as ``shard 0``)."""
    out, section = [], None
    for setting in settings:
        if setting.section != section:
            section = setting.section
            out.append(f"\n[{(section_names or {}).get(section, section)}]")
        value = getattr(config, setting.name)
        if isinstance(value, tuple) and not isinstance(value, Address):
            value = ", ".join(str(v) for v in value)
        if setting.key == "password" and value:
            value = "********"
        out.append(f"{setting.key} = {'' if value is None else value}")
    return "\n".join(out).lstrip() + "\n"
