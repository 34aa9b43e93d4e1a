"""``jaxcl launch`` when a process fails: the user sees the launcher's line, the failing
process's own last error line and where the logs are, not what the survivors print as
they lose it."""
from __future__ import annotations

import sys
import textwrap

from jaxcl import distributed

# process 1 fails by itself after a while; process 0 reports progress, then, stopped by
# the launcher, prints a long traceback like a survivor whose collective lost its peer
FAKE = textwrap.dedent("""
    import signal, sys, time
    me = int(sys.argv[sys.argv.index("--process-id") + 1])
    if me == 1:
        time.sleep(1.0)
        print("task 1 ...", flush=True)
        print("jaxcl: error: checkpoint 3 is damaged: its files differ from its manifest", file=sys.stderr, flush=True)
        sys.exit(2)
    def lose(*_):
        print("Traceback (most recent call last):", flush=True)
        for i in range(70):
            print(f"  File 'survivor.py', line {i}", flush=True)
        print("jax.errors.JaxRuntimeError: UNKNOWN: Gloo AllReduce failed: Connection closed by peer", flush=True)
        sys.exit(1)
    signal.signal(signal.SIGTERM, lose)
    print("SURVIVOR STARTED", flush=True)
    while True:
        time.sleep(0.05)
""")


def test_a_failing_process_is_named_with_its_own_error_and_the_logs(tmp_path, monkeypatch, capfd):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setenv("JAXCL_LAUNCH_LOGS", str(logs))
    said = []
    code = distributed.launch_local(2, [sys.executable, str(script)], grace_s=0.5, echo=said.append)
    shown = capfd.readouterr().out
    assert code == 2
    assert "SURVIVOR STARTED" in shown  # process 0 is shown as it runs...
    assert "Traceback" not in shown and "Gloo" not in shown  # ...but not as it loses process 1
    (line,) = said
    assert line.startswith("jaxcl launch: process 1 of 2 exited with code 2; the others were stopped")
    assert "its last error: jaxcl: error: checkpoint 3 is damaged" in line
    assert f"full logs of every process: {logs}" in line
    assert "Gloo AllReduce failed" in (logs / "process_0.log").read_text()  # kept in its log
