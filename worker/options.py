"""Engine options, each defined once.

An option users can set is a field of a config dataclass in worker/config.py declared with
`option(default, help, ...)`. Everything else derives from those fields:
- `LLM(model, **options)` / `EngineConfig.from_options`: by field name, or by the option's
  key where that differs (`scheduler` for `policy`, `host_kv_memory="4GiB"`);
- the `lmfleet worker` / `serve` flags (`add_engine_flags`, `from_namespace`);
- the `engine:` section of a fleet YAML (`check_options`), and the Helm chart's schema
  (tests/deploy checks it names exactly these keys).
Adding an option is adding one such field.

Kinds, from the field's type: int, float, str (with `choices`), bool (flags `--x` /
`--no-x`), optional bool ("auto" | "on" | "off"; auto: the engine decides), and size
(bytes, given as 4GiB, 512MB or a number).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

_META = "lmfleet_option"
TOGGLES = ("auto", "on", "off")


def option(default: Any, help: str, *, choices: Optional[tuple[str, ...]] = None,
           key: Optional[str] = None, size: bool = False) -> Any:
    """A config field that is also a user-facing engine option (see the module doc).
    `key`: the name users give when it differs from the field's; `size`: bytes that may be
    given with a unit."""
    return dataclasses.field(default=default, metadata={_META: {
        "help": help, "choices": choices, "key": key, "size": size}})


@dataclass(frozen=True)
class EngineOption:
    key: str  # what users write: LLM(key=...), --key-with-dashes, `key:` in a fleet YAML
    field: str  # the config dataclass field it sets
    kind: str  # "int" | "float" | "str" | "bool" | "toggle" | "size"
    default: Any
    help: str
    choices: Optional[tuple[str, ...]] = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def parse(self, value: Any, where: str) -> Any:
        """`value` (from YAML, a flag's text or Python) as the field's value; ValueError
        naming `where`."""
        from lmfleet.worker.config import parse_size

        def bad(expected: str) -> ValueError:
            return ValueError(f"{where}: expected {expected}, got {value!r}")

        if self.kind == "toggle":
            if value is None or value is True or value is False:
                return value
            if isinstance(value, str) and value.lower() in TOGGLES:
                return {"auto": None, "on": True, "off": False}[value.lower()]
            raise bad("auto, on or off")
        if self.kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if value is not True and value is not False:
                raise bad("true or false")
            return value
        if value is None:
            if self.default is None:
                return None
            raise bad(f"a value ({self.kind})")
        if self.kind == "size":
            try:
                return parse_size(value)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        if isinstance(value, bool):
            raise bad(f"a{'n' if self.kind == 'int' else ''} {self.kind}")
        try:
            parsed = {"int": int, "float": float, "str": str}[self.kind](value)
        except (TypeError, ValueError):
            raise bad(f"a{'n' if self.kind == 'int' else ''} {self.kind}") from None
        if self.kind == "int" and isinstance(value, float) and parsed != value:
            raise bad("an int")
        if self.choices is not None and parsed not in self.choices:
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(self.choices)}")
        return parsed


@functools.cache
def engine_options() -> tuple[EngineOption, ...]:
    """Every user-facing engine option, in the order the configs declare them."""
    from lmfleet.worker import config

    found = []
    for klass in (config.ModelConfig, config.CacheConfig, config.SchedulerConfig,
                  config.ParallelConfig):
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            meta = f.metadata.get(_META)
            if meta is None:
                continue
            found.append(EngineOption(
                key=meta["key"] or f.name, field=f.name, kind=_kind(hints[f.name], meta),
                default=f.default, help=meta["help"], choices=meta["choices"]))
    return tuple(found)


def _kind(hint: Any, meta: dict) -> str:
    if meta["size"]:
        return "size"
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if base is bool:
        return "toggle" if optional else "bool"
    for kind, klass in (("int", int), ("float", float), ("str", str)):
        if base is klass:
            return kind
    raise TypeError(f"engine option of unsupported type {hint!r}")


def by_key() -> dict[str, EngineOption]:
    """Options by every name they answer to: key and field, with '_' or '-'."""
    names: dict[str, EngineOption] = {}
    for opt in engine_options():
        for name in (opt.key, opt.field):
            names[name] = names[name.replace("_", "-")] = opt
    return names


def check_options(options: Any, where: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A mapping of options (a fleet YAML's `engine:`) checked and parsed: {key: value}.
    ValueError naming `where` and the key for an unknown key or a bad value."""
    if not isinstance(options, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(options).__name__}")
    known = {k: o for k, o in by_key().items() if o.key not in exclude}
    checked: dict[str, Any] = {}
    for key, value in options.items():
        opt = known.get(str(key))
        if opt is None:
            names = sorted(o.key for o in engine_options() if o.key not in exclude)
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(names)})")
        checked[opt.key] = opt.parse(value, f"{where}.{key}")
    return checked


def config_fields(options: Mapping[str, Any]) -> dict[str, Any]:
    """{key or field: value} -> {config field: value}; other names pass through."""
    names = by_key()
    out: dict[str, Any] = {}
    for name, value in options.items():
        opt = names.get(name)
        if opt is None:
            out[name] = value
        elif opt.kind == "size" or (opt.kind == "toggle" and isinstance(value, str)):
            out[opt.field] = opt.parse(value, name)
        else:
            out[opt.field] = value
    return out


# ---- command line --------------------------------------------------------------------------
def add_engine_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """One flag per option; every default is None (= not given: the engine's default)."""
    for opt in engine_options():
        shown = "auto" if opt.kind == "toggle" else opt.default
        # A None default is explained by the help text ("None: ..."), as is "auto".
        help_text = opt.help if shown is None or f"{shown}:" in opt.help else \
            f"{opt.help} (default: {shown})"
        if opt.kind == "bool":
            parser.add_argument(opt.flag, dest=opt.key, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        elif opt.kind == "toggle":
            parser.add_argument(opt.flag, dest=opt.key, default=None, choices=TOGGLES,
                                help=help_text)
        else:
            parser.add_argument(opt.flag, dest=opt.key, default=None, choices=opt.choices,
                                type=_flag_type(opt), metavar=_metavar(opt), help=help_text)


def _flag_type(opt: EngineOption):
    def parse(text: str) -> Any:
        try:
            return opt.parse(text, opt.flag)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    parse.__name__ = opt.kind  # argparse names it in "invalid <kind> value"
    return parse if opt.choices is None else str


def _metavar(opt: EngineOption) -> Optional[str]:
    if opt.choices is not None:
        return None
    return {"int": "N", "float": "X", "str": "TEXT", "size": "SIZE"}[opt.kind]


def from_namespace(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on a command line built by `add_engine_flags`: {key: value},
    without those left out (or "auto")."""
    given = {}
    for opt in engine_options():
        value = getattr(args, opt.key, None)
        if value is None:
            continue
        value = opt.parse(value, opt.flag)
        if value is not None:
            given[opt.key] = value
    return given
