"""The command line of every subcommand but `train` (whose keys are config.declare's table): each
declares one `Command` — its section, a table of `Option`s and at most one positional — and gets
from it the `--section.key=value` reader (config.parse_cli, the same as train's), -C files (the
one YAML/JSON loader), the one bool parser, the one "did you mean", and a --help that lists every
key with its type and default. Values reach the code as fields of one dataclass made from the
table, so an option is named once."""

import dataclasses
import os
import sys
import textwrap
from dataclasses import dataclass

from .config import BareFlag, ConfigError, flatten, load_config_file, nearest, needs_value, parse_bool, parse_cli

KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "0 or 1"}


@dataclass(frozen=True)
class Option:
    kind: type
    default: object
    desc: str
    choices: tuple = ()
    low: float = None
    high: float = None
    required: bool = False
    path: bool = False  # a path: made absolute when `Command.absolute_paths` (the writer's metadata)
    many: bool = False  # a comma-separated list of `kind`, each checked

    def constraint(self) -> str:
        if self.choices:
            text = "one of " + "|".join(self.choices)
        else:
            text = "a path" if self.path else KIND_NAMES[self.kind]
            if self.low is not None and self.high is not None:
                text += f" from {self.low} to {self.high}"
            elif self.low is not None:
                text += f" >= {self.low}"
        return f"comma-separated, each {text}" if self.many else text

    def default_text(self) -> str:
        if self.required:
            return "required"
        if self.kind is bool:
            return f"default {int(self.default)}"
        if self.default in (None, "", ()):
            return "optional"
        if self.many:
            return "default " + ",".join(str(v) for v in self.default)
        return f"default {self.default!r}"

    def coerce(self, name: str, value):
        """`value` converted to this option's type; ValueError names the key and the value."""
        if value is None or (self.kind is str and value == ""):
            if self.required:
                raise ValueError(f"{name} is required ({self.desc})")
            return self.default
        if self.kind is not bool:
            needs_value(name, value)
        if self.many:
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return tuple(self._one(name, value, item) for item in items
                         if not isinstance(item, str) or item.strip())
        return self._one(name, value, value)

    def _one(self, name: str, value, item):
        try:
            if self.kind is bool:
                result = parse_bool(item)
            elif self.kind is int:
                if isinstance(item, float) and not item.is_integer():
                    raise ValueError
                result = int(item) if isinstance(item, (int, float)) else int(str(item).strip())
            elif self.kind is float:
                result = float(item)
            else:
                result = str(item).strip() if self.many else str(item)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: expected {self.constraint()}") from None
        bad = (self.choices and result not in self.choices) \
            or (self.low is not None and result < self.low) \
            or (self.high is not None and result > self.high)
        if bad:
            raise ValueError(f"{name}={value!r}: expected {self.constraint()}")
        return result


@dataclass(frozen=True)
class Positional:
    name: str  # the field it fills
    metavar: str
    desc: str
    many: bool = False  # one or more (a tuple), else exactly one


class Command:
    """One subcommand's command line: `--<section>.<key>=value` for each key of `options` (or the
    same keys nested under `<section>:` in a -C file), plus `positional` when given. `passthrough`:
    keys of other sections are kept, unchecked, in the `extra` field as `--name=value` arguments
    (demo hands them to train, which checks them)."""

    def __init__(self, name: str, section: str, description: str, options: dict, *,
                 positional: Positional = None, passthrough: str = "", frozen: bool = False,
                 absolute_paths: bool = False):
        self.name, self.section, self.description = name, section, description
        self.options, self.positional, self.passthrough = options, positional, passthrough
        self.absolute_paths = absolute_paths
        fields = [(key, list if option.many else option.kind) for key, option in options.items()]
        if positional is not None:
            fields.append((positional.name, tuple if positional.many else str))
        if passthrough:
            fields.append(("extra", tuple, dataclasses.field(default=())))
        self.values_type = dataclasses.make_dataclass(
            f"{name.capitalize()}Options", fields, frozen=frozen)

    def names(self) -> list:
        return [f"{self.section}.{key}" for key in self.options]

    def usage(self) -> str:
        pos = ""
        if self.positional is not None:
            pos = f" {self.positional.metavar}" + (f" [{self.positional.metavar} ...]" if self.positional.many else "")
        return f"usage: ffcv-imagenet {self.name}{pos} [-C CONFIG] [--{self.section}.KEY=VALUE ...]"

    def help_text(self) -> str:
        lines = [self.usage(), "", self.description, ""]
        if self.positional is not None:
            lines += [f"  {self.positional.metavar:<30} {self.positional.desc}", ""]
        lines += [f"options (--{self.section}.KEY=VALUE, a bool key alone means 1; or in a JSON/YAML "
                  f"file under '{self.section}:' given with -C CONFIG):", ""]
        width = max(len(k) for k in self.options) + len(self.section) + 4
        for key, option in self.options.items():
            text = textwrap.wrap(f"{option.desc} ({option.constraint()}; {option.default_text()})",
                                 width=max(40, 100 - width), break_on_hyphens=False)  # choices whole
            lines.append(f"  {'--' + self.section + '.' + key:<{width}} {text[0]}")
            lines += [f"  {'':<{width}} {line}" for line in text[1:]]
        if self.passthrough:
            lines += ["", self.passthrough]
        return "\n".join(lines)

    def parse(self, argv: list):
        """The values of `argv` (-C files first, in order, then the command line; later wins);
        --help prints help_text and exits 0; a ConfigError names every bad key and value."""
        argv = list(argv)
        if "-h" in argv or "--help" in argv:
            print(self.help_text())
            raise SystemExit(0)
        names = self.names()
        positionals = [] if self.positional is not None else None
        flags = [f"{self.section}.{k}" for k, o in self.options.items() if o.kind is bool]
        files, cli_values = parse_cli(argv, known=["--" + n for n in names], flags=flags,
                                      positionals=positionals)
        given, extra, errors = {}, [], []
        for path in files:
            values = flatten(load_config_file(path), path)
            errors += self._unknown(values, f"in {path}", extra)
            given.update(values)
        errors += self._unknown(cli_values, "on the command line", extra)
        given.update(cli_values)
        if errors:
            raise ConfigError("; ".join(errors))
        values = {name.split(".", 1)[1]: value for name, value in given.items() if name in names}
        if self.passthrough:
            values["extra"] = tuple(extra)
        return self.check(values, positionals)

    def refuse(self, error: Exception) -> int:
        """Print a bad command line as `ffcv-imagenet NAME: ...` with the usage; the exit code, 2."""
        print(f"ffcv-imagenet {self.name}: {error}\n{self.usage()}   (--help lists every key)",
              file=sys.stderr)
        return 2

    def check(self, values: dict, positionals=None):
        """Coerce every option (missing ones take their defaults) into `values_type`; ValueError
        lists each bad key and value."""
        resolved, errors = {}, []
        for key in set(values) - set(self.options) - {"extra"}:
            close = nearest(key, self.options)
            hint = f"; did you mean {self.section}.{close}?" if close else ""
            errors.append(f"unknown option {self.section}.{key}{hint}")
        for key, option in self.options.items():
            try:
                resolved[key] = option.coerce(f"{self.section}.{key}", values.get(key))
            except ValueError as e:
                errors.append(str(e))
        if self.positional is not None:
            resolved[self.positional.name] = self._positional(positionals or [], errors)
        if errors:
            raise ConfigError("; ".join(errors))
        for key, option in self.options.items():
            if self.absolute_paths and option.path and resolved[key]:
                resolved[key] = os.path.abspath(resolved[key])
        if "extra" in values:
            resolved["extra"] = values["extra"]
        return self.values_type(**resolved)

    def _positional(self, given: list, errors: list):
        pos = self.positional
        if not given:
            errors.append(f"{pos.metavar} is required ({pos.desc})")
        elif len(given) > 1 and not pos.many:
            errors.append(f"one {pos.metavar} expected, got {len(given)}: {' '.join(given)}")
        return tuple(given) if pos.many else (given[0] if given else "")

    def _unknown(self, values: dict, where: str, extra: list) -> list:
        """One message per name that is not `<section>.<key>` (names of other sections go to
        `extra` when the command passes them through)."""
        names = self.names()
        errors = []
        for name, value in values.items():
            if name in names:
                continue
            section = name.split(".", 1)[0] if "." in name else None
            if self.passthrough and section not in (None, self.section):
                extra.append(f"--{name}" if isinstance(value, BareFlag) else f"--{name}={value}")
                continue
            close = nearest(name if section else f"{self.section}.{name}", names)
            hint = f"; did you mean --{close}?" if close else ""
            if section is not None and section != self.section:
                errors.append(f"unknown section '{section}' in --{name} {where} ({self.name}'s "
                              f"options are all under {self.section}){hint}")
            else:
                errors.append(f"unknown option --{name} {where}{hint}")
        return errors
