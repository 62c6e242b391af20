"""``python -m recognition.launch``: start MXNet ps-lite jobs (scheduler, servers, workers) locally or over ssh.

    python -m recognition.launch -n 2 -s 1 -- python -m recognition.train_softmax --kvstore dist_sync ...
    python -m recognition.launch -n 2 -s 2 --hosts hosts.txt -- python -m recognition.train_softmax \\
        --kvstore dist_device_sync --gpus 0,1,2,3,4,5,6,7 ...

MXNet's own ``tools/launch.py`` (dmlc-tracker) does this for insightface's ``--kvstore dist_sync`` runs
(``recognition/arcface_mxnet/train.py``) but does not run on Python 3.11. Every process gets the DMLC variables
(``DMLC_ROLE``, ``DMLC_PS_ROOT_URI``, ``DMLC_PS_ROOT_PORT``, ``DMLC_NUM_SERVER``, ``DMLC_NUM_WORKER`` and
``DMLC_NODE_HOST``, the address ps-lite binds: ``127.0.0.1`` locally, else the host's name from the hosts file);
workers also get ``LOCAL_RANK`` / ``LOCAL_SIZE`` (their index among the workers of their host). Scheduler and
servers run ``python -c "import mxnet"`` (MXNet becomes a server/scheduler on import when ``DMLC_ROLE`` says so).

Hosts file: one host per line, optionally ``slots=N`` (workers on that host, default 1; mpirun's format, as
insightface's ``partial_fc/mxnet/hosts/host_8``); ``#`` starts a comment. The scheduler runs on the first host,
servers and workers are spread over the hosts in order. Remote processes are started with ``ssh HOST 'cd CWD &&
env VARS... COMMAND'`` (password-less ssh, the same paths and venv on every host; ``--env NAME`` forwards more
variables, as ``mpirun -x``).

The launcher forwards SIGINT/SIGTERM to every process, and when any process exits with a non-zero status it names
it (role, index, host, pid, status or signal), stops all the others (SIGTERM, then SIGKILL after ``--grace``
seconds) and exits with status 1 (130 after Ctrl-C). When every worker exits 0, the scheduler and servers get
``--grace`` seconds to finish, and the launcher exits 0.
"""
import argparse
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

logger = logging.getLogger(__name__)

ROLES = ("scheduler", "server", "worker")
SERVER_COMMAND = ("-c", "import mxnet")  # with DMLC_ROLE=server|scheduler, importing mxnet runs the node
FORWARDED_ENV = ("PYTHONPATH", "OMP_NUM_THREADS", "MXNET_ENGINE_TYPE", "CUDA_VISIBLE_DEVICES", "PS_VERBOSE",
                 "MXNET_KVSTORE_BIGARRAY_BOUND")


class LaunchError(RuntimeError):
    """Bad launcher arguments or hosts file."""


def parse_hosts(path):
    """``[(host, slots)]`` from a hosts file (``host [slots=N]`` per line, ``#`` comments)."""
    hosts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            slots = 1
            for field in fields[1:]:
                key, _, value = field.partition("=")
                if key not in ("slots", "max_slots") or not value.isdigit() or int(value) < 1:
                    raise LaunchError(f"{path}:{lineno}: expected 'host [slots=N]', got {line!r}")
                if key == "slots":
                    slots = int(value)
            hosts.append((fields[0], slots))
    if not hosts:
        raise LaunchError(f"{path}: no host listed")
    return hosts


def free_port(host="127.0.0.1"):
    """A TCP port free on ``host`` now (the scheduler binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def plan(num_workers, num_servers, command, hosts=None, port=None, python=None, env_names=(), cwd=None,
         environ=None):
    """The processes of a job: list of dicts ``{role, index, host, env, argv}``.

    ``env`` holds only the variables the launcher sets (plus forwarded ones for ssh); ``argv`` is what to execute
    (locally the command itself, remotely ``ssh ... 'cd CWD && env ... COMMAND'``). Pure: nothing is started.
    """
    if num_workers < 1 or num_servers < 1:
        raise LaunchError(f"need at least 1 worker and 1 server, got -n {num_workers} -s {num_servers}")
    if not command:
        raise LaunchError("no training command after '--'")
    python = python or sys.executable
    environ = os.environ if environ is None else environ
    local = not hosts
    if local:
        hosts = [("127.0.0.1", num_workers)]
    root_host = hosts[0][0]
    port = port or (free_port() if local else 9091)
    common = {"DMLC_PS_ROOT_URI": root_host, "DMLC_PS_ROOT_PORT": str(port),
              "DMLC_NUM_SERVER": str(num_servers), "DMLC_NUM_WORKER": str(num_workers)}

    # workers fill each host's slots in order (round-robin over hosts when the slots are exhausted)
    slots = [s for _, s in hosts]
    worker_hosts = []
    while len(worker_hosts) < num_workers:
        before = len(worker_hosts)
        for (host, _), n in zip(hosts, slots):
            take = min(n, num_workers - len(worker_hosts))
            worker_hosts += [host] * take
        if len(worker_hosts) == before:
            break
    server_hosts = [hosts[i % len(hosts)][0] for i in range(num_servers)]

    procs = [{"role": "scheduler", "index": 0, "host": root_host, "command": [python, *SERVER_COMMAND]}]
    procs += [{"role": "server", "index": i, "host": h, "command": [python, *SERVER_COMMAND]}
              for i, h in enumerate(server_hosts)]
    local_index = {}
    for i, h in enumerate(worker_hosts):
        local_index[h] = local_index.get(h, 0) + 1
    seen = {}
    workers = []
    for i, h in enumerate(worker_hosts):
        lr = seen.get(h, 0)
        seen[h] = lr + 1
        workers.append({"role": "worker", "index": i, "host": h, "command": list(command),
                        "extra": {"LOCAL_RANK": str(lr), "LOCAL_SIZE": str(local_index[h])}})
    procs += workers

    forwarded = {n: environ[n] for n in (*FORWARDED_ENV, *env_names) if n in environ}
    cwd = cwd or os.getcwd()
    for p in procs:
        env = dict(common, DMLC_ROLE=p["role"], DMLC_NODE_HOST=p["host"], **p.pop("extra", {}))
        if local:
            p["env"] = env
            p["argv"] = p.pop("command")
        else:
            env = {**forwarded, **env}
            p["env"] = env
            remote = "cd {} && env {} {}".format(shlex.quote(cwd),
                                                 " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                                                 " ".join(shlex.quote(a) for a in p.pop("command")))
            p["argv"] = ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes", p["host"], remote]
    return procs


def describe(p):
    return f"{p['role']} {p['index']} on {p['host']}" + (f" (pid {p['pid']})" if p.get("pid") else "")


def _status(code):
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(running, grace):
    for proc in running:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in running):
        time.sleep(0.1)
    for proc in running:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def run(procs, grace=10.0, poll=0.2, out=None):
    """Start ``procs`` (from :func:`plan`), supervise them, return the exit status (0 only if every worker exited 0).
    """
    out = out or sys.stderr
    started = []
    interrupted = []

    def on_signal(signum, _frame):
        interrupted.append(signum)
        for proc in started:
            if proc.poll() is None:
                _signal_group(proc, signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            env = {**os.environ, **p["env"]}
            proc = subprocess.Popen(p["argv"], env=env, start_new_session=True)
            p["pid"], p["proc"] = proc.pid, proc
            started.append(proc)
        workers = [p for p in procs if p["role"] == "worker"]
        while True:
            failed = [p for p in procs if p["proc"].poll() not in (None, 0)]
            if failed or interrupted:
                if interrupted:
                    print(f"recognition.launch: {signal.Signals(interrupted[0]).name} received; stopping every "
                          "process", file=out, flush=True)
                else:
                    first = failed[0]
                    print(f"recognition.launch: {describe(first)} {_status(first['proc'].returncode)}; stopping the "
                          f"{sum(q['proc'].poll() is None for q in procs)} other running process(es)", file=out,
                          flush=True)
                _stop(started, grace)
                return 130 if interrupted else 1
            if all(p["proc"].poll() == 0 for p in workers):
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and any(p["proc"].poll() is None for p in procs):
                    time.sleep(poll)
                _stop(started, 0)
                return 0
            time.sleep(poll)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if any(proc.poll() is None for proc in started):
            _stop(started, 0)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m recognition.launch",
        description="Start an MXNet ps-lite job (scheduler, servers, workers) locally or over ssh.",
        epilog="example: python -m recognition.launch -n 2 -s 1 -- python -m recognition.train_softmax "
               "--config configs/synthetic.py --kvstore dist_sync")
    p.add_argument("-n", "--num-workers", type=int, required=True, help="worker processes (ranks)")
    p.add_argument("-s", "--num-servers", type=int, default=None, help="server processes (default: = workers)")
    p.add_argument("-H", "--hosts", default=None, help="hosts file (host [slots=N] per line); default: this machine")
    p.add_argument("--port", type=int, default=None, help="scheduler port (default: a free port locally, 9091 ssh)")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="forward this environment variable to remote processes (repeatable)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL (default 10)")
    p.add_argument("--dry-run", action="store_true", help="print the command lines and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- training command")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        hosts = parse_hosts(args.hosts) if args.hosts else None
        procs = plan(args.num_workers, args.num_servers or args.num_workers, command, hosts=hosts, port=args.port,
                     env_names=args.env)
    except (LaunchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for p in procs:
            prefix = "" if hosts else " ".join(f"{k}={shlex.quote(v)}" for k, v in p["env"].items()) + " "
            print(prefix + " ".join(shlex.quote(a) for a in p["argv"]))
        return 0
    return run(procs, grace=args.grace)


if __name__ == "__main__":
    sys.exit(main())
