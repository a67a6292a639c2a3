"""The household server's SuperExec: launches the ServerApp of the household's own run and of nothing else.

Flower 1.42's SuperLink, in its default `--isolation subprocess`, starts a SuperExec
(flwr/superlink/cli/flower_superlink.py `_start_superexec_if_needed`) that launches the ServerApp of every
run anyone starts through the Control API, which has no account authentication: whoever reaches the
address would run their code on the server. `ember federate serve` therefore starts the SuperLink with
`--isolation process` and `--superexec-auth-secret-file` (Runtime API `AcquireTask` then needs an HMAC made
with that secret, flwr/supercore/dependencies/superexec.py), and runs this loop, Flower's own SuperExec loop
(flwr/supercore/superexec/run_superexec.py) with one check added: a task is launched only when it belongs
to the household's run and its FAB is the signed one; any other run it is handed before that is stopped
through the Control API and named in this process's log. Once the household's ServerApp is launched it
takes no more tasks (a run started later is never launched by anyone on this machine) and stays, as the
ServerApp's parent, until it is stopped or `serve` (PARENT_PID) is gone.

Run as `python -m assistant.federation.launcher ADDRESS CA SECRET_FILE RUN_ID FAB_HASH PARENT_PID`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REFUSED = "refused run"
LAUNCHED = "launched the household's run"


def main(argv: list[str]) -> int:
    """Acquire the SuperLink's pending ServerApp tasks until the household's comes and launch it (return 1
    if the executor does not accept it); every other run acquired before is stopped. Then wait."""
    from flwr.proto.control_pb2 import StopRunRequest  # pylint: disable=no-name-in-module
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.executor import LaunchResultStatus
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.plugin import AutoExecPlugin

    from assistant.federation.processes import control_client

    address, ca, secret_file, run_text, fab_hash, parent = argv
    run_id = int(run_text)
    start_parent_process_monitor(int(parent))        # `serve` gone: this and the ServerApp go too
    secret = load_superexec_auth_secret(secret_file)
    runtime = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=False, root_certificates=Path(ca).read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}))],
        retry_invoker=make_simple_http_retry_invoker())
    plugin = AutoExecPlugin(runtime_api_address=address, insecure=False, root_certificates_path=ca,
                            runtime_dependency_install=False, executor=SubprocessExecutor())
    while True:
        got = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
        if got.HasField("task") and got.token:
            task = got.task
            if task.run_id == run_id and task.fab_hash == fab_hash:
                result = plugin.launch_task(token=got.token, task=task)
                print(f"{LAUNCHED} {run_id}: {result.status}", flush=True)
                if result.status != LaunchResultStatus.ACCEPTED:
                    return 1
                while True:              # the ServerApp's parent: it watches this pid (--parent-pid).
                    time.sleep(0.5)      # Short naps: the parent monitor's SIGINT lands between them
            else:
                print(f"{REFUSED} {task.run_id}: not the household's run of its signed app "
                      f"(FAB {task.fab_hash[:12]}); its ServerApp was not started", flush=True)
                control = control_client(address, Path(ca))
                try:
                    control.StopRun(StopRunRequest(run_id=task.run_id))
                except Exception as err:  # it stays claimed and never runs either way
                    print(f"could not stop run {task.run_id}: {type(err).__name__}", flush=True)
                finally:
                    control.close()
        time.sleep(0.5)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(0)
