"""An asyncio parent and its child set up side by side, then meet at a barrier.

The child binds a TCP socket; the parent prepares its side (here: a work directory
the child must not use before it exists). Neither goes on until both are ready, and
a setup failure on either side aborts cleanly: the other side reports it instead of
hanging. This is systemd's barrier pattern, written for asyncio:

    python examples/barrier_subprocess.py                 # both sides succeed
    python examples/barrier_subprocess.py --fail child    # the child's setup fails
    python examples/barrier_subprocess.py --fail parent   # the parent's setup fails
    python examples/barrier_subprocess.py --loop uvloop   # the same on uvloop

Exit status: 0 when both sides got ready and talked, 1 when start-up was aborted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import aiosync


async def parent(args: argparse.Namespace) -> int:
    with aiosync.Barrier() as gate, tempfile.TemporaryDirectory() as tmp:
        child_args = ["--child", "--loop", args.loop]
        if args.fail == "child":
            child_args.append("--fail-setup")
        proc = await aiosync.create_subprocess_exec(
            sys.executable,
            __file__,
            *child_args,
            share={"gate": gate},  # the child gets the CHILD side; we are now PARENT
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        workdir = Path(tmp) / "work"

        # -- our own setup, while the child does its own ----------------------------
        if args.fail == "parent":
            print("parent: setup failed; aborting the start-up")
            gate.abort()  # the child's next wait returns False
            # Wait until the child noticed and exited (its exit counts as aborting).
            async with asyncio.timeout(args.timeout):
                await gate.wait_abortion()
                await proc.wait()
            print(f"parent: the child stopped too (exit status {proc.returncode})")
            return 1
        workdir.mkdir()
        print("parent: setup done")

        # -- meet the child ----------------------------------------------------------
        async with asyncio.timeout(args.timeout):
            ready = await gate.place_and_sync()
        if not ready:
            # The child aborted, or died, before reaching the barrier.
            await proc.wait()
            print(f"parent: the child failed its setup (exit status {proc.returncode})")
            return 1

        # Both sides are ready: the child's socket is bound, so connecting cannot fail.
        line = await proc.stdout.readline()
        port = int(line.decode().rsplit(":", 1)[1])
        print(f"parent: both sides ready; the child listens on port {port}")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"hello from the parent, work in {workdir.name}\n".encode())
        await writer.drain()
        reply = await reader.readline()
        print(f"parent: the child answered {reply.decode().strip()!r}")
        writer.close()
        await writer.wait_closed()
        await proc.wait()
        print(f"parent: done (child exit status {proc.returncode})")
        return 0 if proc.returncode == 0 else 1


async def child(args: argparse.Namespace) -> int:
    gate = aiosync.inherited()["gate"]
    assert isinstance(gate, aiosync.Barrier)
    with gate:
        if args.fail_setup:
            print("child: setup failed; aborting the start-up", file=sys.stderr)
            gate.abort()  # the parent's place_and_sync() returns False
            return 1

        answered = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await reader.readline()
            print(f"child: got {request.decode().strip()!r}", file=sys.stderr)
            writer.write(b"hello back\n")
            await writer.drain()
            writer.close()
            answered.set()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print(f"child: listening on 127.0.0.1:{port}", flush=True)

        if not await gate.place_and_sync():
            print("child: the parent aborted; exiting", file=sys.stderr)
            server.close()
            return 1
        async with server, asyncio.timeout(args.timeout):
            await answered.wait()
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--fail", choices=["parent", "child"], help="make a setup fail")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per wait")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fail-setup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    side = child if args.child else parent
    if args.loop == "uvloop":
        import uvloop

        return uvloop.run(side(args))
    return asyncio.run(side(args))


if __name__ == "__main__":
    sys.exit(main())
