"""Command line: ``python main.py --config exps/ranpac/cifar.json [--set key=value ...] [--output-dir runs]``.

Without ``--config`` it runs the offline demo (RanPAC on Split Fashion-MNIST with ImageNet-pretrained
EfficientNet-Lite0, ``exps/demo/fmnist_ranpac.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "exps" / "demo" / "fmnist_ranpac.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MIST / RanPAC / SimpleCIL class-incremental learning.")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"experiment JSON (official keys); default: the offline demo {DEMO_CONFIG.name}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, parsed against its type (repeatable), e.g. --set device=cpu")
    parser.add_argument("--output-dir", type=Path, default=Path("runs"), help="where runs are written (default ./runs)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from utils.errors import UserError  # imported late so --help stays fast

    try:
        from utils.config import load_config
        import trainer

        cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
        paths = trainer.run(cfg, args.output_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; results.json holds every finished task.", file=sys.stderr)
        return 130
    for path in paths:
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
