"""Command line: ``python main.py --config exps/ranpac/cifar.json [--set key=value ...] [--output-dir runs]``.

``python main.py --resume runs/<name>/<timestamp>`` continues a run after its last completed task.

Without ``--config`` it runs the offline demo (RanPAC on Split Fashion-MNIST with ImageNet-pretrained
EfficientNet-Lite0, ``exps/demo/fmnist_ranpac.json``).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "exps" / "demo" / "fmnist_ranpac.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MIST / RanPAC / SimpleCIL class-incremental learning.")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"experiment JSON (official keys); default: the offline demo {DEMO_CONFIG.name}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, parsed against its type (repeatable), e.g. --set device=cpu")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where runs are written (default ./runs; not with --resume, which writes into RUN_DIR)")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR (runs/<name>/<timestamp>) after its last completed task, "
                             "with its saved config; --set may change only device, num_workers, progress, "
                             "eval_batch_size, stop_after_task, verify_images")
    return parser.parse_args(argv)


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")


def main(argv=None) -> int:
    """Run the command line; returns the exit status.

    0: done (or stopped on purpose by ``stop_after_task``); 1: the run failed (results.json has status
    "failed" and the error, the log the traceback); 2: bad input (config, data, weights, device, checkpoint);
    130: interrupted by Ctrl-C or SIGTERM (results.json has status "interrupted"; resume with --resume).
    """
    args = parse_args(argv)
    from utils import distributed  # imported late so --help stays fast
    from utils.errors import RunStopped, UserError

    where = f"[rank {distributed.launch_rank()}] " if distributed.launched() else ""

    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt) if _main_thread() else None
    try:
        import trainer
        from utils.config import load_config

        if args.resume is not None:
            if args.config is not None:
                raise UserError("--resume uses the config saved in the run folder; drop --config.")
            if args.output_dir is not None:
                raise UserError(f"--resume writes into the run folder {args.resume} itself; drop --output-dir "
                                f"{args.output_dir} (or start a new run there without --resume).")
            paths = trainer.resume(args.resume, args.overrides)
        else:
            cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
            paths = trainer.run(cfg, args.output_dir or Path("runs"))
    except UserError as exc:
        if distributed.launch_rank() == 0:  # torchrun: every rank meets the same bad input; one line, once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:
        print(str(exc), file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted; results.json holds every finished task (status 'interrupted'); continue with "
              "python main.py --resume <run folder>.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line here, the traceback is in the run's log
        print(f"{where}error: the run failed: {type(exc).__name__}: {exc} (traceback in the run's log; results.json "
              "has status 'failed')", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        distributed.destroy()
    if distributed.launch_rank() == 0:  # torchrun: rank 0 reports
        for path in paths:
            print(f"results: {path}")
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
