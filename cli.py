"""
The command line of every script (train, eval, sample, bench, data.prepare, experiments/*): preset
files of plain assignments (config/*.py, train.py only) and --key=value overrides, applied in order
(later ones win), each value typed by its key's default; one set of boolean spellings; did-you-mean
for a misspelt key; --help from the keys and what they are; and every mistake one `error:` line
with exit status 2 (under torchrun printed once, by rank 0, and exit 2 on every rank).

    given = cli.parse(argv, {"n": 8, "device": "cpu"})   # {key: typed value} for the keys given
    cli.run(main, usage_text)                            # main(sys.argv[1:]) as a command
"""
import difflib
import inspect
import math
import os
import runpy
import sys
import types

BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", list: "text"}
TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "str"}


class UsageError(ValueError):
    """A mistake on the command line or in a preset: one `error:` line, exit status 2."""


def parse(argv, defaults: dict, presets=False, unknown="unknown option", kinds=WORDS, error=UsageError,
          finite=True) -> dict:
    """--key=value arguments (and preset files if presets) -> {key: value} for the keys given, each
    value of its default's type (a list default collects every value given). A bare --key of a boolean
    means true. unknown: how messages call a key that is not in defaults; kinds: how they name types;
    finite: refuse nan and inf here (else the caller's range checks name them)."""
    given, keys = {}, "keys" if presets else "options"
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if key in defaults and not eq and type(defaults[key]) is bool:
                eq, text = "=", "true"
            if not eq:
                raise error(f"expected --key=value, got {arg!r} (--help lists the {keys})")
            _known(key, defaults, arg, "the command line", presets, unknown, error)
            items, source = {key: typed(key, text, defaults[key], kinds, error, finite)}, "the command line"
        elif presets and arg.endswith(".py") and os.path.isfile(arg):
            items, source = preset(arg, error), arg
        else:
            raise error(f"{arg!r} is neither --key=value nor a preset file (config/*.py)" if presets else
                        f"arguments look like --key=value, got {arg!r} (--help lists the {keys})")
        for key, value in items.items():
            _known(key, defaults, key, source, presets, unknown, error)
            want = type(defaults[key])
            value = float(value) if want is float and type(value) is int else value  # lr = 1 means 1.0
            if want is list:
                given[key] = given.get(key, []) + [value]
            elif type(value) is not want:
                raise error(f"{key} must be {kinds[want]}, got {type(value).__name__} {value!r} in {source}")
            else:
                given[key] = value
    return given


def typed(key, text, default, kinds=WORDS, error=UsageError, finite=True):
    """The command-line text of --key as the type of its default."""
    want = type(default)
    try:
        value = BOOLS[text.strip().lower()] if want is bool else (text if want in (str, list) else want(text.strip()))
    except (KeyError, ValueError):
        raise error(f"--{key} must be {kinds[want]}, got {text!r}") from None
    if finite and want is float and not math.isfinite(value):
        raise error(f"--{key} must be a finite number, got {text!r}")
    return value


def preset(path, error=UsageError) -> dict:
    """The plain assignments of a preset file (names starting with _, modules and functions left out)."""
    try:
        ran = runpy.run_path(path)
    except Exception as e:  # noqa: BLE001 - a preset is user code: say which file failed and how
        raise error(f"preset {path} does not run: {type(e).__name__}: {e}") from None
    return {k: v for k, v in ran.items() if not k.startswith("_") and not callable(v)
            and not isinstance(v, types.ModuleType)}


def _known(key, defaults, shown, source, presets, unknown, error):
    if key in defaults:
        return
    close = difflib.get_close_matches(key, defaults, n=1)
    if presets:  # keys that preset files set too: named bare, with where they came from
        raise error(f"{unknown} {key!r} in {source}" + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; valid keys: {', '.join(defaults)}")
    raise error(f"{unknown} " + (f"--{key} (did you mean --{close[0]}?)" if close else repr(shown))
                + f"; options: {', '.join('--' + k for k in defaults)}")


def comments(cls) -> dict:
    """{field: its comment} from a dataclass's source (`name: type = default  # comment`)."""
    found = {}
    for line in inspect.getsource(cls).splitlines():
        name, _, rest = line.strip().partition(":")
        if name.isidentifier() and "#" in rest:
            found[name] = rest.split("#", 1)[1].strip()
    return found


def usage(doc, options: dict, show=str, presets=False) -> str:
    """--help: the docstring's first paragraphs, then every key with its default and what it is.
    options: {key: (default, what it is)}."""
    head = "options (--key=value" + ("; a preset config/*.py sets them too" if presets else "") + "):\n"
    return doc.strip() + "\n\n" + head + "\n".join(
        f"  --{k}={'' if v == [] else show(v)}".ljust(34) + " " + text for k, (v, text) in options.items())


def run(main, usage_text, errors=(ValueError, OSError, MemoryError), argv=None, interrupted="interrupted"):
    """Run main(argv) as a command: --help prints usage_text; an error of the kinds given becomes one
    `error:` line (printed by rank 0 only under torchrun) and exit status 2, unless it carries its own
    exit status as .code (its message already printed: a run stopped by a signal); Ctrl-C exits 130.
    main may return an exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(usage_text)
        sys.exit(0)
    try:
        code = main(argv)
    except errors as err:  # OSError: files.WriteError and friends name the file
        if getattr(err, "code", None) is not None:
            sys.exit(err.code)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    sys.exit(code if type(code) is int else 0)
