"""The command line: one thin command per verb (parse and check flags, call the library, print).

Where outputs go, one rule for every verb: a file named with -o/--out goes exactly there (its folder
must exist); without it, outputs go into ./out/ (created on demand, ignored by git), named after the
command's input.
"""

import click

# Light modules only here and in the command modules: the pipeline stages (pandas, OR-Tools, jsonschema,
# torch behind them) are imported by the commands that use them, so `nfsearch --help` and a bad flag
# answer at once.
from nfsearch.cli import gpu_runs, profiling, search, serving
from nfsearch.cli.common import Group


@click.group(name="nfsearch", cls=Group, context_settings={"help_option_names": ["-h", "--help"],
                                                            "max_content_width": 100})
@click.version_option(package_name="nfsearch", help="Print the version and exit.")
def main():
    """Find and run NanoFlow-style intra-GPU overlap schedules for LLM serving.

    \b
    analyze -> profile -> solve -> simulate   (no GPU needed with a bundled or --analytic profile)
    run, tune, compare                        (on a CUDA GPU)
    check [--update]                          (re-solve the golden cases against re-scored goldens)

    Without -o, outputs go into ./out/, named after their input.
    """


for _command in (search.analyze, profiling.profile, search.solve, search.simulate, search.check,
                 gpu_runs.run_cmd, gpu_runs.compare_cmd, profiling.calibrate_cmd, gpu_runs.tune_cmd,
                 serving.bench_cmd, serving.serve_cmd):
    main.add_command(_command)
