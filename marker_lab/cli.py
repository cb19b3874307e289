"""`marker-lab`: the command line. `marker-lab run [hydra overrides]` runs a cell (or a sweep with -m).

Before handing over to Hydra, `run` composes the config once so a bad override fails in one line that names the
key, before anything is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from marker_lab.core import environment
from marker_lab.core.errors import config_error_line

USAGE = """marker-lab <command> [args]

commands:
  run [overrides...]        run one train-then-eval cell (Hydra overrides, e.g. condition=c4 seed=137)
  run -m [overrides...]     run a sweep: every cell of a grid (e.g. +experiment=marker_transfer), resumable
  status <sweep_dir>        every expected cell of a sweep: complete / running / pending / failed / stale / corrupt
  aggregate <sweep_dir>     tables of a sweep's results (runs by itself after a sweep)
  eval <sweep_dir>          the sampled eval of a sweep's trained cells (engine_per=base): one engine per shared
                            base model; resumable (runs by itself after a sweep's cells); one at a time per sweep
  bench [--model M] [--out F]  speed of one 7B cell on this GPU: baseline vs fast path (random init);
                            `bench --model toy --quick` checks every code path on CPU (numbers mean nothing)

`marker-lab run --help` shows Hydra's help; `marker-lab run --cfg job` prints the composed config.
--verbose (any command): full tracebacks (as HYDRA_FULL_ERROR=1 does)
"""


def check_config(overrides: list[str], config_dir: str | None = None) -> None:
    """Compose and check a single-run config and its inputs (with a user's config folder on the search path, as
    Hydra's --config-dir puts it); exit 1 with one line on error."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from marker_lab.config.schema import register_configs
    from marker_lab.core.errors import ConfigError
    from marker_lab.core.files import CONF
    from marker_lab.cell.preflight import preflight

    register_configs()

    run_dir = None
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            extra = [f"hydra.searchpath=[file://{Path(config_dir).expanduser().resolve()}]"] if config_dir else []
            node = compose("config", overrides=extra + overrides, return_hydra_config=True)
        try:  # where the run would write (`${hydra:runtime.cwd}` and the like resolve only inside Hydra's run)
            run_dir = str(node.hydra.run.dir)
        except Exception:  # noqa: BLE001 - then the refusal is the line alone
            run_dir = None
        with open_dict(node):
            del node["hydra"]
            node.output_dir = run_dir or "unused"
        preflight(OmegaConf.to_object(node))  # output_dir: a directory that can be created and written
    except ConfigError as e:
        _refused(run_dir, f"config error: {e}")
    except Exception as e:  # hydra/omegaconf composition errors
        _refused(run_dir, f"config error: {config_error_line(e)}")


def _refused(run_dir: str | None, line: str) -> None:
    """A single run refused at start-up: its one line, also in the run directory's cell_status.json (`failed`)
    when the config composed far enough to name that directory; nothing else is written. Exits 2."""
    if run_dir is not None:
        from marker_lab.results.contract import write_cell_status

        try:
            write_cell_status(Path(run_dir), "failed", error=line)
        except OSError:  # a directory that cannot be written: the line on stderr is what is left
            pass
    print(f"marker-lab: {line}", file=sys.stderr)
    sys.exit(2)


def _config_dir(args: list[str]) -> tuple[str | None, list[str]]:
    """Hydra's `--config-dir DIR` / `-cd DIR` (a user's own config folder, layered on conf/), and the other args."""
    for i, a in enumerate(args):
        if a in ("--config-dir", "-cd") and i + 1 < len(args):
            return args[i + 1], args[:i] + args[i + 2:]
        if a.startswith("--config-dir="):
            return a.split("=", 1)[1], args[:i] + args[i + 1:]
    return None, args


def _cell(cfg):
    """The task Hydra runs for each cell; the recipe (and torch) is imported only once a cell really runs, so
    `--help`, `--cfg job` and config errors answer in about a second. A process entry too (a sweep's cell runs
    in a process of its own), so it sets what must be set before CUDA starts."""
    environment.use_expandable_segments()
    from marker_lab.cell.main import cell_main

    return cell_main(cfg)


def _hydra_run(args: list[str]) -> None:
    """Hydra's app on `args` (one cell; a sweep with -m; Hydra's --help, --cfg and the like), as `marker-lab run`."""
    from marker_lab.config.schema import register_configs
    from marker_lab.core.files import CONF
    from marker_lab.launch.hydra_compat import run_app

    register_configs()
    run_app(_cell, str(CONF), "config", args, prog="marker-lab run")


def main(argv: list[str] | None = None) -> None:
    """`marker-lab <command> ...`; Ctrl-C anywhere is one line and exit code 130 (a traceback with --verbose or
    HYDRA_FULL_ERROR=1)."""
    environment.use_expandable_segments()  # first: before anything can start CUDA
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    if verbose:  # Hydra's own switch for full tracebacks, which is what --verbose asks for
        from marker_lab.launch.hydra_compat import show_full_tracebacks

        argv.remove("--verbose")
        show_full_tracebacks()
    try:
        _dispatch(argv)
    except KeyboardInterrupt:
        if environment.full_error():
            raise
        what = " ".join(["marker-lab", *argv[:1]])
        print(f"marker-lab: interrupted: {what}; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "run":
        config_dir, plain = _config_dir(rest)
        if not any(a.startswith("-") for a in plain):  # plain overrides: check them first; Hydra handles its flags
            check_config(plain, config_dir)
        _hydra_run(rest)
    elif command == "bench":
        from marker_lab.bench.run import main as bench_main

        bench_main(rest)
    elif command == "eval":
        parser = argparse.ArgumentParser(prog="marker-lab eval")
        parser.add_argument("sweep_dir", help="a sweep directory whose cells ran with engine_per=base")
        parser.add_argument("--wait", action="store_true", help="wait for a shared eval already running on it "
                            "(a sweep's launcher does), instead of stopping at once")
        args = parser.parse_args(rest)
        import logging

        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
        from marker_lab.launch.lock import EVAL_LOCK_FILE, SweepBusy, SweepLock

        try:
            with SweepLock(Path(args.sweep_dir), EVAL_LOCK_FILE, wait=args.wait):  # one shared eval at a time
                from marker_lab.cell.shared import evaluate_pending  # torch and the rest: after the lock answered

                report = evaluate_pending(args.sweep_dir)
        except SweepBusy as e:
            sys.exit(f"marker-lab eval: {e}")
        print(f"marker-lab eval: {len(report.done)} cells evaluated in {args.sweep_dir}"
              + (f"; {len(report.problems)} not:" if report.problems else ""))
        for line in report.problems:
            print(f"  {line}", file=sys.stderr)
        if report.problems:
            sys.exit(1)
    elif command in ("status", "aggregate"):
        parser = argparse.ArgumentParser(prog=f"marker-lab {command}")
        parser.add_argument("sweep_dir", help="a sweep directory (with its manifest.json), or any directory holding "
                                              "run_result.json files, e.g. outputs/runs")
        args = parser.parse_args(rest)
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            if command == "status":
                from marker_lab.results.sweep import format_status

                print(format_status(args.sweep_dir))
            else:
                from marker_lab.results.aggregate import aggregate

                print(aggregate(args.sweep_dir))
        except FileNotFoundError as e:
            sys.exit(f"marker-lab {command}: {e}")
    else:
        argparse.ArgumentParser(prog="marker-lab").error(f"unknown command {command!r}\n\n{USAGE}")


if __name__ == "__main__":
    main()
