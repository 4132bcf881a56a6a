"""A Dask LocalCluster on 127.0.0.1 in a process of its own, for the tests.

``python -m tests.dask_cluster [--daemonic] [--workers N]`` prints one JSON
line (the scheduler's address, the pids of the nannies' workers) once the
cluster is up, and closes the cluster when its standard input closes.  In a
process of its own, the cluster's processes and threads are not the test
process's: the tests' check for children left behind, and fork's warning
about threads, stay about aioproc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys


async def serve(daemonic: bool, workers: int) -> None:
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.worker.daemon": daemonic}):
        async with LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # not 8787: see DaskPool
            host="127.0.0.1",
            asynchronous=True,
        ) as cluster:
            async with Client(cluster, asynchronous=True) as client:
                pids = await client.run(os.getpid)
            print(json.dumps({"address": cluster.scheduler_address, "pids": pids}), flush=True)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, sys.stdin.read)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--daemonic", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(serve(args.daemonic, args.workers))


if __name__ == "__main__":
    main()
