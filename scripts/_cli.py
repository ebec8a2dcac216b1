"""Shared CLI plumbing: repo on sys.path, every user mistake as one short message.

Exit status of every script: 0 done (and --help), 2 a mistake the user can fix (flags,
config file, paths, weights), 3 training diverged, 130 interrupted (Ctrl-C), 143
terminated (SIGTERM); scripts/predict.py also exits 1 when some images could not be read.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull", "--helpxml")


def fail(message: str, code: int = EXIT_USER_ERROR):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def user_error_types() -> tuple[type, ...]:
    """What ends in one line and exit status 2: every user error of the package (its one
    base class, mfuser_jax/errors.py; configs/base.py's ConfigError is one too), and a
    missing file or an unsupported choice the standard library reports."""
    from mfuser_jax.errors import UserError
    return (UserError, FileNotFoundError, NotImplementedError)


def quiet_logging():
    """Library INFO logs (Orbax, XLA backends) drown the progress lines: show warnings and
    up unless the user asked for a --verbosity. The package's own warnings are lines for
    the user ('warning: ...'), not absl records with time, thread and source line."""
    from absl import flags, logging
    if "verbosity" in flags.FLAGS and not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    plain_package_warnings()


class _PlainFormatter(logging.Formatter):
    def format(self, record):
        return f"{record.levelname.lower()}: {record.getMessage()}"


def plain_package_warnings():
    """mfuser_jax's loggers print 'warning: <message>' on stderr, once (no propagation to
    absl's handler on the root logger). Returns the handler."""
    logger = logging.getLogger("mfuser_jax")
    for h in logger.handlers:
        if isinstance(h.formatter, _PlainFormatter):
            return h
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PlainFormatter())
    handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False
    return handler


def run_main(fn, *args, **kwargs):
    """Runs fn; user errors end in 'error: <message>' on stderr and exit status 2."""
    quiet_logging()
    from mfuser_jax.errors import Preempted, TrainingDiverged
    try:
        return fn(*args, **kwargs)
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except TrainingDiverged as e:
        fail(str(e), EXIT_DIVERGED)
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C)", EXIT_INTERRUPTED)
    except user_error_types() as e:
        fail(str(e) if not isinstance(e, FileNotFoundError) or not e.filename else
             f"file not found: {e.filename}")


def config_or_workdir(config, workdir: str):
    """--config when given, else the config W/config.json recorded (one error line when
    there is none)."""
    if config is not None:
        return config
    from mfuser_jax.workdir import config_from_workdir
    config = run_main(config_from_workdir, workdir)
    print(f"config: {os.path.join(os.path.abspath(workdir), 'config.json')}", flush=True)
    return config


def run_app(main, *, positional_args: bool = False):
    """absl's app.run with the flags parsed by `parse_flags`: --help exits 0; a bad flag or
    config file ends in one message and exit 2. `positional_args`: main takes paths after
    the flags (argv[1:]); otherwise a stray argument is an error."""
    from absl import app

    from configs.base import ConfigError

    def parser(argv):
        rest = parse_flags(argv)
        if len(rest) > 1 and not positional_args:
            fail(f"unexpected argument {rest[1]!r} (flags take the form --name=value; "
                 "see --help)")
        return rest

    try:
        app.run(main, flags_parser=parser)
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C)", EXIT_INTERRUPTED)
    except (ConfigError, ValueError, NotImplementedError) as e:
        fail(str(e))


# --------------------------------------------------------------------------- flag parsing

def parse_flags(argv: list[str]) -> list[str]:
    """FLAGS(argv), with help exiting 0 and every parse error as one message, exit 2.

    ml_collections defers a missing config file until the config is first read (so that
    --help works without one): it is read here, so the mistake surfaces before any work."""
    from absl import flags
    argv = resolve_config_paths(argv)
    if "-h" in _before_separator(argv[1:]):  # absl knows --help and -? only
        argv = [a if a != "-h" or i > _separator(argv) else "--help" for i, a in enumerate(argv)]
    try:
        rest = flags.FLAGS(argv)
    except SystemExit as e:  # absl's help flags print the usage, then exit 1
        if e.code == 1 and any(a in HELP_FLAGS for a in _before_separator(argv[1:])):
            sys.exit(0)
        raise
    except Exception as e:  # noqa: BLE001 -- every parse failure is the user's input
        fail(describe_flag_error(e, argv))
    for name, value in _config_flag_values():
        arg = _config_arg(argv, name)
        if value is None:
            fail(f"config file {arg}: get_config() returned None (a missing return?)")
        try:
            value.keys()  # ml_collections' stand-in for a failed load raises its IOError here
        except Exception as e:  # noqa: BLE001
            fail(describe_config_file_error(arg, e))
    return rest


def resolve_config_paths(argv: list[str]) -> list[str]:
    """A relative --config path that is not below the current folder but is below the
    repository (configs/demo.py run from elsewhere) is taken from the repository."""
    names = [n for n, _ in _config_flag_values(parsed_only=False)]
    out, end = list(argv), _separator(argv)
    for i in range(1, end):
        for name in names:
            for prefix in (f"--{name}=", f"-{name}="):
                if out[i].startswith(prefix):
                    out[i] = prefix + _resolve_config_path(out[i][len(prefix):])
            if out[i] in (f"--{name}", f"-{name}") and i + 1 < end:
                out[i + 1] = _resolve_config_path(out[i + 1])
    return out


def _resolve_config_path(arg: str) -> str:
    path, sep, rest = arg.partition(":")
    if not path or os.path.isabs(path) or os.path.exists(path):
        return arg
    in_repo = os.path.join(REPO, path)
    return in_repo + sep + rest if os.path.exists(in_repo) else arg


def describe_flag_error(e: BaseException, argv: list[str]) -> str:
    from absl import flags

    from configs.base import ConfigError
    if isinstance(e, flags.Error) and "Error whilst parsing config file" in str(e):
        inner = e.__cause__ or e.__context__  # absl wraps the config file's ValueError
        name = next((n for n, _ in _config_flag_values(parsed_only=False)), "config")
        return describe_config_file_error(_config_arg(argv, name), inner or e)
    if isinstance(e, flags.Error):  # unknown flag, bad value, missing required flag
        msg = str(e).strip().splitlines()[0]
        required = re.match(r"flag --(\S+)=None: Flag --\S+ must have a value other", msg)
        if required:
            return f"--{required.group(1)} is required (see --help)"
        return re.sub(r"^flag (--\S+?)=", r"\1=", msg)
    if isinstance(e, ConfigError):
        return str(e)
    names = [n for n, _ in _config_flag_values(parsed_only=False)]
    for name in names:
        arg = _config_arg(argv, name)
        if isinstance(e, (KeyError, AttributeError)) and not _is_from_config_file(e, arg):
            unknown = describe_unknown_override(name, arg, argv)
            if unknown:
                return unknown
        return describe_config_file_error(arg, e)
    return f"{type(e).__name__}: {e}"


def describe_config_file_error(arg: str, e: BaseException) -> str:
    """A failure while loading `--config arg`: the file and line, and what went wrong."""
    from configs.base import ConfigError
    path = arg.split(":", 1)[0]
    while e.__context__ is not None and "Error whilst parsing config file" in str(e):
        e = e.__context__  # ml_collections re-raises TypeError/ValueError with a traceback
    if isinstance(e, ConfigError):
        return str(e)
    if isinstance(e, OSError):
        if not path:
            return "--config needs a file, e.g. --config configs/demo.py"
        if not os.path.exists(path):
            where = (f" (looked in {os.getcwd()} and {REPO})"
                     if not os.path.isabs(path) else "")
            return f"config file not found: {path}{where}"
        if os.path.isdir(path):
            return f"--config needs a file, not the folder {path} (e.g. {path}/demo.py)"
        return f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}"
    if isinstance(e, SyntaxError):
        return f"syntax error in config file {e.filename} line {e.lineno}: {e.msg}"
    line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                 if os.path.abspath(f.filename) == os.path.abspath(path)), None)
    where = f"{path} line {line}" if line else arg
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"config file {where}: {type(e).__name__}: {message}"


def describe_unknown_override(name: str, arg: str, argv: list[str]) -> str | None:
    """'--config.totl_steps: no field totl_steps; did you mean total_steps?' for the first
    override whose path is not in the config; None when every path exists."""
    from ml_collections import ConfigDict
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser
    try:
        config = ConfigFileFlagParser(name, lock_config=False).parse(arg)
        config.keys()
    except Exception:  # noqa: BLE001 -- then the file itself is at fault
        return None
    prefix = f"--{name}."
    for a in _before_separator(argv[1:]):
        if not a.startswith(prefix) and not a.startswith(f"-{prefix}"):
            continue
        path = a.split("=", 1)[0].split(".", 1)[1]
        node, done = config, []
        for part in path.split("."):
            if not isinstance(node, ConfigDict):
                return (f"--{name}.{path}: {name}.{'.'.join(done)} is a "
                        f"{type(node).__name__}, not a section")
            if part not in node:
                keys = list(node.keys())
                where = ".".join([name, *done])
                close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
                hint = (f"did you mean {' or '.join('.'.join([where, c]) for c in close)}?"
                        if close else f"its fields: {', '.join(keys)}")
                return f"--{name}.{path}: {where} has no field {part!r}; {hint}"
            node, done = node[part], [*done, part]
    return None


def _is_from_config_file(e: BaseException, arg: str) -> bool:
    path = os.path.abspath(arg.split(":", 1)[0])
    return any(os.path.abspath(f.filename) == path
               for f in traceback.extract_tb(e.__traceback__))


def _config_flag_values(parsed_only: bool = True):
    """(name, value) of each config-file flag that has a file (given or default)."""
    from absl import flags
    from ml_collections.config_flags.config_flags import is_config_flag
    for name, flag in flags.FLAGS._flags().items():  # noqa: SLF001 -- absl has no public list
        if is_config_flag(flag) and flag.name == name:
            if not parsed_only:
                yield name, None
            elif flag.present or flag.value is not None:
                yield name, flag.value


def _config_arg(argv: list[str], name: str) -> str:
    """The config file argument given for --name, else the flag's default."""
    from absl import flags
    arg = _flag_arg(argv, name)
    return arg if arg is not None else flags.FLAGS[name].default_as_str.strip("'")


def _flag_arg(argv: list[str], name: str) -> str | None:
    """The value given for --name (either --name=V or --name V), else None."""
    args = _before_separator(argv[1:])
    for i, a in enumerate(args):
        if a in (f"--{name}", f"-{name}") and i + 1 < len(args):
            return args[i + 1]
        for p in (f"--{name}=", f"-{name}="):
            if a.startswith(p):
                return a[len(p):]
    return None


def _before_separator(args: list[str]) -> list[str]:
    return args[:args.index("--")] if "--" in args else args


def _separator(argv: list[str]) -> int:
    return argv.index("--") if "--" in argv else len(argv)
