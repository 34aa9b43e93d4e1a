"""``--devices N`` for the benchmark scripts: ask XLA for N host devices (each batch is
then split across them). Imported first thing, before jax: XLA reads the flag at start."""
import os
import sys


def from_argv(argv=sys.argv) -> None:
    if "--devices" in argv:
        n = int(argv[argv.index("--devices") + 1])
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


from_argv()
