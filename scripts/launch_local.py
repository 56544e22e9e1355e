"""Launch N cooperating JAX processes on this machine (multi-host runs, simulated on one host).

    python scripts/launch_local.py --num_processes=2 --devices_per_process=4 -- \
        scripts/finetune.py --config=configs/sst2_minilm.py:smoke --workdir=/tmp/run

Each child gets ``LM_COORDINATOR=127.0.0.1:<free port>``, ``LM_NUM_PROCESSES`` and
``LM_PROCESS_ID`` (read by ``lm.distributed.initialize``); with ``--devices_per_process=K`` it
also runs on CPU with K fake devices (``XLA_FLAGS=--xla_force_host_platform_device_count=K``,
cross-process collectives over gloo), with ``--gpus_per_process=K`` on its own K GPUs
(``CUDA_VISIBLE_DEVICES``). Output is streamed line by line with a ``[p0]``/``[p1]`` prefix.
If any child fails, the others are stopped and the exit status is the first failure's.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(args, pid: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(
        LM_COORDINATOR=f"{args.host}:{port}",
        LM_NUM_PROCESSES=str(args.num_processes),
        LM_PROCESS_ID=str(pid),
        PYTHONUNBUFFERED="1",
    )
    if args.devices_per_process:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        n = args.devices_per_process
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    elif args.gpus_per_process:
        k = args.gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(pid * k + i) for i in range(k))
    return env


def stream(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=0, help="fake CPU devices each")
    p.add_argument("--gpus_per_process", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py args... (or a program)")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command to run after --, e.g. -- scripts/finetune.py --config=...")
    if cmd[0].endswith(".py"):
        cmd = [sys.executable, *cmd]
    port = args.port or free_port(args.host)
    procs, threads = [], []
    for i in range(args.num_processes):
        proc = subprocess.Popen(
            cmd,
            env=child_env(args, i, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        procs.append(proc)
        threads.append(threading.Thread(target=stream, args=(proc, f"[p{i}]"), daemon=True))
        threads[-1].start()
    status = 0
    try:
        pending = set(range(len(procs)))
        while pending:
            for i in list(pending):
                rc = procs[i].poll()
                if rc is None:
                    continue
                pending.discard(i)
                if rc and not status:
                    status = rc if rc > 0 else 128 - rc  # killed by signal N: 128 + N
                    print(f"[launch] process {i} exited with {rc}; stopping the others", flush=True)
                    for j in pending:  # peers would otherwise wait on collectives forever
                        procs[j].send_signal(signal.SIGTERM)
            time.sleep(0.05)
    except KeyboardInterrupt:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        status = 130
    for proc in procs:
        proc.wait()
    for t in threads:
        t.join(timeout=5)
    return status


if __name__ == "__main__":
    sys.exit(main())
