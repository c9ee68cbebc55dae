"""A Ray cluster of several nodes on 127.0.0.1, for the cluster tests.

    python tests/local_cluster.py --gcs-port P --dashboard-port D --temp-dir /tmp/rt-x --nodes 2

starts a head (with the dashboard and its Jobs API) and N-1 more nodes, 1 CPU each, prints
`ready`, and runs until SIGTERM, when it removes every node. Token authentication follows the
environment (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN).

Why not `ray start --address` for the extra nodes: `ray start` turns 127.0.0.1 into the
machine's network address, so a joining node cannot reach a head that listens on loopback
only. `ray.cluster_utils.Cluster` (Ray's own multi-node-on-one-machine test harness) takes the
node address as given. Run it with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment so
that drivers started by the Jobs API resolve `127.0.0.1` the same way.
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gcs-port", type=int, required=True)
    parser.add_argument("--dashboard-port", type=int, required=True)
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()

    from ray.cluster_utils import Cluster

    node = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": 200 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "temp_dir": args.temp_dir, "gcs_server_port": args.gcs_port, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": args.dashboard_port,
        "dashboard_agent_listen_port": free_port()})
    for i in range(1, args.nodes):
        # Each node gets its own temp dir, as separate machines would: nodes sharing one would
        # share one runtime-env cache, and one node's cleanup would delete a job's working
        # directory from under the driver on another.
        cluster.add_node(**node, temp_dir=f"{args.temp_dir}-n{i}", dashboard_agent_listen_port=free_port())
    # Job drivers find their cluster through the `ray_current_cluster` file of the temp dir of the
    # node they start on; only a head started by `ray start` writes one. Without it, a driver on the
    # second node would take the latest Ray instance started on this machine (in a test session,
    # the session's own local instance) for its cluster.
    from ray._private.utils import get_ray_address_file

    for temp_dir in [args.temp_dir] + [f"{args.temp_dir}-n{i}" for i in range(1, args.nodes)]:
        with open(get_ray_address_file(temp_dir), "w") as fh:
            fh.write(f"127.0.0.1:{args.gcs_port}")
    print("ready", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    cluster.shutdown()


if __name__ == "__main__":
    main()
