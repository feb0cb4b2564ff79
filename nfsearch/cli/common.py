"""What every command shares: one-line errors (`nfsearch: error: ...`, exit 2), option types, the model and
workload flags, the search problem the flags name, and writing outputs (into ./out/, all or none, atomic)."""

import json
import math
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from click.core import ParameterSource

from nfsearch.errors import NfsearchError
from nfsearch.files import write_text_atomic
from nfsearch.specs import DTYPE_BYTES, load_model, load_workload, parse_lengths, workload_from_flags

OUT_DIR = Path("out")
MAX_SEED = 2**31 - 1
MAX_TIME_LIMIT_S = 3600.0


# ---- errors and option types ---------------------------------------------------------------------

class Interrupted(Exception):
    """Ctrl-C inside a command; carried past click (which would print its own lines) to main."""


class Group(click.Group):
    """Every failure a user can cause is one line `nfsearch: error: ...` on stderr: click's usage errors
    and NfsearchError exit 2, an interrupt exits 130; never a traceback or click's multi-line usage."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted() from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:                 # a caller that handles click's exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name or "nfsearch", complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as exc:         # a bare `nfsearch`: show the help, it is not a mistake
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            fail(exc.format_message() + where, 2)
        except click.ClickException as exc:
            fail(exc.format_message(), 2)
        except NfsearchError as exc:
            fail(str(exc), 2)
        except (Interrupted, KeyboardInterrupt, click.exceptions.Abort):
            fail("interrupted (outputs are written whole or not at all)", 130)
        sys.exit(code if isinstance(code, int) else 0)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def fail(message: str, code: int):
    echo("nfsearch: error: " + " ".join(str(message).split()), err=True)
    sys.exit(code)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange lets nan through (every comparison with nan is false); this refuses it."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


TIME_LIMIT = FiniteFloatRange(0.0, MAX_TIME_LIMIT_S, min_open=True)


# ---- model + workload flags ----------------------------------------------------------------------

GPU_HELP = "Bundled GPU: h100-sxm, h200 or a100-sxm."

# the flags that describe a batch; a named --workload already fixes all of them
BATCH_FLAGS = {"num_decode": "--decode", "decode_context": "--context", "prefill": "--prefill",
                "tp_degree": "--tp", "dtype": "--dtype", "decode_contexts": "--decode-contexts",
                "prefill_prefix": "--prefill-prefix"}


def workload_options(f):
    """--model, and --workload (W1-W7 or a YAML file) or the flags that describe a dense batch."""
    options = [
        click.option("--model", "model_ref",
                     help="Bundled name (e.g. llama-3-8b), model YAML, or HuggingFace config.json "
                          "(default: the workload's model)."),
        click.option("--workload", "workload_ref",
                     help="W1-W7 or a workload YAML file; or describe the batch with --decode/--prefill instead."),
        click.option("--decode", "num_decode", type=click.IntRange(0, 2**20),
                     help="Decode requests in the batch (instead of --workload)."),
        click.option("--context", "decode_context", type=click.IntRange(1, 2**22), default=1024, show_default=True,
                     help="Average context of a decode request, in tokens."),
        click.option("--decode-contexts", "decode_contexts", default="",
                     help="Each decode request's context, comma separated (e.g. 1000,1200,96): the batch an "
                          "engine forms; --decode may be left out and --context is their mean."),
        click.option("--prefill", "prefill", default="",
                     help="Prompt (or prefill chunk) lengths in tokens, comma separated (e.g. 512,512)."),
        click.option("--prefill-prefix", "prefill_prefix", default="",
                     help="Per --prefill chunk, the tokens of its request already cached before it (chunked "
                          "prefill), comma separated (e.g. 0,1024; default none)."),
        click.option("--tp", "tp_degree", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="Tensor-parallel degree."),
        click.option("--dtype", type=click.Choice(sorted(DTYPE_BYTES)), default="bf16", show_default=True,
                     help="Weight and activation type."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def resolve_specs(model_ref, workload_ref, num_decode, decode_context, prefill, tp_degree, dtype,
                  decode_contexts="", prefill_prefix=""):
    """The model and workload the flags name; refuses batch flags a named workload would ignore."""
    ctx = click.get_current_context()
    is_given = lambda name: ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)
    if workload_ref:
        given = [flag for name, flag in BATCH_FLAGS.items() if is_given(name)]
        if given:
            raise NfsearchError(f"--workload {workload_ref} fixes the batch, so {', '.join(given)} would be ignored: "
                                f"drop {'it' if len(given) == 1 else 'them'}, or describe the whole batch with "
                                f"--decode/--context/--prefill/--tp/--dtype instead of --workload")
        workload = load_workload(workload_ref)
    elif num_decode is not None or prefill or decode_contexts:
        contexts = parse_lengths(decode_contexts, "--decode-contexts")
        prefixes = parse_lengths(prefill_prefix, "--prefill-prefix", may_be_zero=True)
        context = None if contexts and not is_given("decode_context") else decode_context
        workload = workload_from_flags(num_decode or 0, context, parse_lengths(prefill, "--prefill"), tp_degree,
                                       dtype, contexts, prefixes)
    else:
        raise NfsearchError("no workload: give --workload W1..W7|FILE or --decode/--prefill flags")
    model_ref = model_ref or workload.model
    if not model_ref:
        raise NfsearchError("no model: give --model")
    return load_model(model_ref), workload


# ---- the search problem the flags name -----------------------------------------------------------

def cli_problem(model, workload, profile_path, num_layers, allow_extrapolation):
    from nfsearch.cost import default_profile, make_problem
    from nfsearch.profile import load
    table = load(profile_path) if profile_path else default_profile(model, workload)
    if table.is_analytic:
        echo(f"note: using the {table.label} (no measured table for {model.name})", err=True)
    return make_problem(model, workload, table, num_layers, allow_extrapolation)


# ---- outputs -------------------------------------------------------------------------------------

@contextmanager
def all_or_none(paths):
    """Write a command's output files together: each is written atomically, and when the writing
    stops part-way (an error, Ctrl-C) the ones made so far are removed, with ./out/ if it was made here."""
    paths = [Path(p) for p in paths]
    existed = {p for p in paths if p.exists()}
    made_out = not OUT_DIR.exists() and any(p.parent == OUT_DIR for p in paths)
    if made_out:
        try:
            OUT_DIR.mkdir()
        except OSError as exc:
            raise NfsearchError(f"{OUT_DIR}: cannot create ({exc.strerror})") from None
    try:
        yield
    except BaseException:
        for path in paths:
            if path not in existed:
                path.unlink(missing_ok=True)
        if made_out and OUT_DIR.is_dir() and not any(OUT_DIR.iterdir()):
            OUT_DIR.rmdir()
        raise


def check_outputs(paths, suffixes: tuple[str, ...], may_create_out: bool = False) -> None:
    """Refuse before any work or writing: a wrong suffix, a folder in a file's place, a missing or
    unwritable folder. Multi-file outputs are all checked here, so none is left half-made."""
    for given in paths:
        text = str(given)
        if not text:
            raise NfsearchError("output path is empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # (bytes that are not UTF-8 in a file name: they could not even be printed back)
            raise NfsearchError(f"{printable(text)}: output name is not valid UTF-8") from None
        if text.endswith(("/", os.sep)):
            raise NfsearchError(f"{text}: output names a folder, not a file")
        path = Path(text)
        if len(path.name.encode()) > 255:
            raise NfsearchError(f"{text[:60]}...: output file name is too long")
        if suffixes and not path.name.endswith(suffixes):
            raise NfsearchError(f"{path}: output must end with {' or '.join(suffixes)}")
        if path.is_dir():
            raise NfsearchError(f"{path}: cannot write (a folder is in the way)")
        parent = path.parent
        if may_create_out and parent == OUT_DIR and not parent.exists():
            continue                                             # made on demand by _make_out_dir
        if not parent.is_dir():
            raise NfsearchError(f"{path}: cannot write (no directory {parent})")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise NfsearchError(f"{path}: cannot write (no permission in {parent})")


def printable(text: str) -> str:
    """Text safe to print: file names may carry undecodable bytes (surrogates) that stdout refuses."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def echo(text: str, err: bool = False, nl: bool = True) -> None:
    click.echo(printable(text), err=err, nl=nl)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "plan"

def write_json(path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=float) + "\n")
