"""A parent starts several children and waits until each has finished its setup.

Every child gets the same `aiosync.Completion`, "ready", and calls ``ready.complete()``
once its setup is done (here: it computes its shard of a result and writes it to a
file). The parent awaits one completion per child, with a timeout, and names the
children that never got ready: those that failed and those still stuck.

    python examples/completion_ready.py                       # 4 children, all ready
    python examples/completion_ready.py --fail 1 --hang 2     # one fails, one hangs
    python examples/completion_ready.py --loop uvloop

Exit status: 0 if every child got ready, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiosync


async def parent(args: argparse.Namespace) -> int:
    with aiosync.Completion() as ready, tempfile.TemporaryDirectory() as tmp:
        children = []
        for n in range(args.children):
            flags = ["--fail-setup"] if n in args.fail else []
            flags += ["--hang-setup"] if n in args.hang else []
            proc = await aiosync.create_subprocess_exec(
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--dir",
                tmp,
                "--loop",
                args.loop,
                *flags,
                share={"ready": ready},
            )
            children.append(proc)
        print(f"parent: started {len(children)} children; waiting up to {args.timeout} s")

        started = time.monotonic()
        got = 0
        try:
            async with asyncio.timeout(args.timeout):
                for _ in children:
                    await ready.wait()  # takes one completion: one more child is ready
                    got += 1
        except TimeoutError:
            pass
        print(f"parent: {got} of {len(children)} ready after {time.monotonic() - started:.2f} s")

        # A child that is ready completes as its very last step and exits; give those
        # a moment to exit, then name the others.
        never = []
        for n, proc in enumerate(children):
            try:
                async with asyncio.timeout(1.0):
                    status = await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
                never.append(f"child {n} (still setting up; killed)")
                continue
            if status != 0:
                never.append(f"child {n} (failed, exit status {status})")
        for line in never:
            print(f"parent: never got ready: {line}")

        if got == len(children):
            total = sum_shards(Path(tmp))
            print(f"parent: all ready; the shards add up to {total}")
            return 0
        return 1


async def child(args: argparse.Namespace) -> int:
    ready = aiosync.inherited()["ready"]
    assert isinstance(ready, aiosync.Completion)
    with ready:
        n = args.child
        if args.fail_setup:
            print(f"child {n}: setup failed", file=sys.stderr)
            return 1
        if args.hang_setup:
            await asyncio.Event().wait()  # stuck for ever (the parent will kill it)
        shard = sum(i * i for i in range(n * 1000, (n + 1) * 1000))
        write_shard(Path(args.dir), n, shard)
        ready.complete()  # setup done: exactly one of the parent's waits gets through
        return 0


# Tiny local file I/O, kept out of the coroutines: it never waits on anything.
def write_shard(directory: Path, n: int, value: int) -> None:
    (directory / f"shard-{n}").write_text(str(value))


def sum_shards(directory: Path) -> int:
    return sum(int(p.read_text()) for p in sorted(directory.glob("shard-*")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--fail", type=int, action="append", default=[], metavar="N")
    parser.add_argument("--hang", type=int, action="append", default=[], metavar="N")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--fail-setup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hang-setup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    side = child if args.child is not None else parent
    if args.loop == "uvloop":
        import uvloop

        return uvloop.run(side(args))
    return asyncio.run(side(args))


if __name__ == "__main__":
    sys.exit(main())
