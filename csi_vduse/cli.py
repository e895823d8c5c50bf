"""The `csi-vduse` command."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from csi_vduse import __version__, logs
from csi_vduse.kernel import sysfs


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
    parser.add_argument("--log-level", default=None, help="default info (CSI_VDUSE_LOG_LEVEL)",
                        choices=["debug", "info", "warning", "error"])  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    export = sub.add_parser(
        "export", help="serve a file or an RBD image as a VDUSE block device (foreground)"
    )
    export.add_argument(
        "file", help="backing file (created sparse when missing), or rbd:POOL/IMAGE"
    )
    export.add_argument("--ceph-monitors", help="rbd: the monitors, e.g. v2:10.0.0.1:3300")
    export.add_argument("--ceph-user", help="rbd: the cephx user, without client. (admin)")
    export.add_argument("--ceph-keyfile", help="rbd: a file holding the user's key or keyring")
    export.add_argument("--name", required=True, help="VDUSE and vdpa device name")
    export.add_argument("--size", help="size when creating (or growing) the file, e.g. 1G")
    export.add_argument("--queues", type=int, default=1, help="number of virtqueues")
    export.add_argument("--queue-size", type=int, default=256, help="descriptors per queue")
    export.add_argument("--readonly", action="store_true")
    export.add_argument(
        "--cache", default="page", choices=("page", "direct"),
        help="file backing: through the page cache (default), or direct (O_DIRECT)",
    )  # fmt: skip
    export.add_argument(
        "--attach", default="virtio-vdpa", choices=sorted(sysfs.ATTACH_DRIVERS),
        help="virtio-vdpa: a host block device /dev/vdX (default); vhost-vdpa: a character "
        "device /dev/vhost-vdpa-N for a VMM (QEMU: -device vhost-vdpa-device-pci,vhostdev=PATH)",
    )  # fmt: skip

    sub.add_parser("doctor", help="check whether this host can serve VDUSE devices")

    serve = sub.add_parser(
        "serve", help="run the CSI driver",
        epilog="Every flag can also be set by environment variable: CSI_VDUSE_<FLAG> "
        "(upper case, '-' as '_'), e.g. CSI_VDUSE_NODE_ID. Flags win over the environment.",
    )  # fmt: skip
    serve.add_argument(
        "--endpoint", help="unix:///PATH of the CSI socket (default unix:///csi/csi.sock)"
    )
    serve.add_argument("--node-id", help="this node's name (required; CSI_VDUSE_NODE_ID)")
    serve.add_argument("--driver-name", help="CSI driver name (default vduse.csi.dev)")
    serve.add_argument("--state-dir", help="staging state, on the host (default /run/csi-vduse)")
    serve.add_argument("--data-dir", help="volume images (default /var/lib/csi-vduse)")
    serve.add_argument("--components", help="comma list of identity,controller,node (default all)")
    serve.add_argument("--max-volumes", type=int, help="volumes this node serves at most (64)")
    serve.add_argument(
        "--reconcile-interval",
        type=float,
        help="seconds between passes that re-attach unserved devices (30)",
    )
    serve.add_argument(
        "--health-address", help="HOST:PORT serving /livez, /readyz and /metrics (default: none)"
    )
    serve.add_argument(
        "--registration-dir",
        help="the kubelet's plugins_registry dir: register with the kubelet there "
        "(default: none, do not register)",
    )
    serve.add_argument(
        "--kubelet-endpoint",
        help="the CSI socket's path on the host, as the kubelet dials it "
        "(required with --registration-dir)",
    )
    serve.add_argument("--log-format", help="json (default) or text")
    serve.add_argument(
        "--controller-scope", choices=["node", "cluster"],
        help="node (default): the controller serves this node's volumes; cluster: every "
        "node's, through VduseVolume objects that each node's agent acts on",
    )  # fmt: skip
    serve.add_argument("--kubeconfig", help="cluster scope: a kubeconfig (default in-cluster)")
    serve.add_argument(
        "--agent-wait", type=float, help="cluster scope: seconds to wait for an agent (30)"
    )

    agent = sub.add_parser(
        "agent", help="act on this node's VduseVolumes and VduseSnapshots (beside serve)",
        epilog="Flags can also be set by environment variable: CSI_VDUSE_<FLAG>.",
    )  # fmt: skip
    agent.add_argument("--node-id", help="this node's name (required; CSI_VDUSE_NODE_ID)")
    agent.add_argument("--endpoint", help="the node plugin's CSI socket (unix:///csi/csi.sock)")
    agent.add_argument("--kubeconfig", help="a kubeconfig (default: in-cluster credentials)")
    agent.add_argument("--resync-interval", type=int, help="seconds between full passes (30)")
    agent.add_argument("--log-format", help="json (default) or text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.log_level or "info", getattr(args, "log_format", None) or "text")
    try:
        if args.command == "serve":
            from csi_vduse.config import ServeConfig
            from csi_vduse.csi.server import serve

            flags = ("endpoint", "node_id", "driver_name", "state_dir", "data_dir",
                     "components", "max_volumes", "log_format", "reconcile_interval",
                     "health_address", "registration_dir", "kubelet_endpoint",
                     "controller_scope", "kubeconfig", "agent_wait")  # fmt: skip
            given = {f: getattr(args, f) for f in flags if getattr(args, f) is not None}
            if args.log_level is not None:
                given["log_level"] = args.log_level
            config = ServeConfig(**given)
            logs.setup(config.log_level, config.log_format)
            return serve(config)
        if args.command == "agent":
            from csi_vduse.cluster.run import run_agent
            from csi_vduse.config import AgentConfig

            names = ("node_id", "endpoint", "kubeconfig", "resync_interval", "log_format")
            given = {f: getattr(args, f) for f in names if getattr(args, f) is not None}
            if args.log_level is not None:
                given["log_level"] = args.log_level
            agent_config = AgentConfig(**given)
            logs.setup(agent_config.log_level, agent_config.log_format)
            return run_agent(agent_config)
        if args.command == "export":
            from csi_vduse.lifecycle.export import ExportOptions, run_export

            fields = ("file", "name", "size", "queues", "queue_size", "readonly", "attach",
                      "cache", "ceph_monitors", "ceph_user", "ceph_keyfile")  # fmt: skip
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
