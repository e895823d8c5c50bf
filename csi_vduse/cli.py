"""The `csi-vduse` command."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from csi_vduse import __version__


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "input"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"--{where.replace('_', '-')}: {msg}" if where != "input" else msg)
    return "; ".join(parts)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csi-vduse", description=__doc__)
    parser.add_argument("--version", action="version", version=f"csi-vduse {__version__}")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    export = sub.add_parser("export", help="serve a file as a VDUSE block device (foreground)")
    export.add_argument("file", help="backing file; created sparse when missing")
    export.add_argument("--name", required=True, help="VDUSE and vdpa device name")
    export.add_argument("--size", help="size when creating (or growing) the file, e.g. 1G")
    export.add_argument("--queues", type=int, default=1, help="number of virtqueues")
    export.add_argument("--queue-size", type=int, default=256, help="descriptors per queue")
    export.add_argument("--readonly", action="store_true")

    sub.add_parser("doctor", help="check whether this host can serve VDUSE devices")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )  # fmt: skip
    try:
        if args.command == "export":
            from csi_vduse.lifecycle.export import ExportOptions, run_export

            fields = ("file", "name", "size", "queues", "queue_size", "readonly")
            opts = ExportOptions.model_validate({f: getattr(args, f) for f in fields})
            return run_export(opts)
        if args.command == "doctor":
            from csi_vduse.doctor import run_doctor

            return run_doctor()
    except ValidationError as e:
        print(f"csi-vduse: error: {_validation_message(e)}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, ValueError) as e:
        print(f"csi-vduse: error: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
