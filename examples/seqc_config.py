"""A parent publishes a live configuration; child processes read consistent snapshots.

The parent keeps a configuration record in shared memory (an aiosync.SeqRecord) and
updates it every few milliseconds, without ever waiting for its readers. Child
processes, started with aiosync.create_subprocess_exec(share={"cfg": record}), read it
as fast as they like; every snapshot they get is one version the parent wrote, never a
mix of two. Each child reports how many snapshots it read and how often a write was in
progress so that it had to wait and retry (each update is held open for --hold ms, as a
multi-step update would be):

    python examples/seqc_config.py                          # 2 children, 1 second
    python examples/seqc_config.py --children 3 --seconds 2 --period 1
    python examples/seqc_config.py --hold 0                 # one-call writes only
    python examples/seqc_config.py --latch                  # readers never wait
    python examples/seqc_config.py --loop uvloop

Exit status: 0 when every child saw only consistent snapshots, in order.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aiosync

# version, running (1/0), requests per second, timeout in seconds, check
FORMAT = "qqddq"


def config(version: int, running: bool = True) -> tuple[int, int, float, float, int]:
    """Configuration number `version`; its fields are derived from the version so that
    a reader can tell a torn snapshot (a mix of two versions) from a real one."""
    rate = 100.0 + version
    timeout = 0.5 * (version % 10 + 1)
    return (version, int(running), rate, timeout, version * 7919 ^ 0x5A5A)


async def parent(args: argparse.Namespace) -> int:
    with aiosync.SeqRecord(FORMAT, latch=args.latch) as cfg:
        version = 1
        cfg.write(*config(version))
        children = [
            await aiosync.create_subprocess_exec(
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--loop",
                args.loop,
                share={"cfg": cfg},  # the child finds it in aiosync.inherited()
                stdout=asyncio.subprocess.PIPE,
            )
            for n in range(1, args.children + 1)
        ]
        mode = "latch" if args.latch else "plain"
        print(f"parent: publishing a {mode} record to {len(children)} children", flush=True)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(args.period / 1000)
            version += 1
            if args.hold:
                # A multi-step update (say, store the new values, then validate them
                # before they go live): the write stays open meanwhile, and readers
                # back off (asynchronously) or, in latch mode, read the previous copy.
                with cfg.seqcount.write():
                    cfg.write(*config(version))
                    await asyncio.sleep(args.hold / 1000)
            else:
                cfg.write(*config(version))  # never waits for the readers
        cfg.write(*config(version + 1, running=False))
        print(f"parent: published {version} versions, then told the children to stop")
        ok = True
        for proc in children:
            assert proc.stdout is not None
            async with asyncio.timeout(args.timeout):
                out = (await proc.stdout.read()).decode().strip()
                code = await proc.wait()
            print(out)
            ok = ok and code == 0
        print("parent: every snapshot was consistent" if ok else "parent: a child failed")
        return 0 if ok else 1


async def child(args: argparse.Namespace) -> int:
    cfg = aiosync.inherited()["cfg"]
    assert isinstance(cfg, aiosync.SeqRecord)
    with cfg:
        snapshots = retries = bad = 0
        first = last = 0
        while True:
            try:
                snapshot = cfg.read_nowait()
            except aiosync.WouldBlock:
                retries += 1  # a write was in progress: wait it out asynchronously
                async with asyncio.timeout(args.timeout):
                    snapshot = await cfg.read()
            snapshots += 1
            version, running = snapshot[0], snapshot[1]
            if snapshot != config(version, bool(running)) or version < last:
                bad += 1
            first = first or version
            last = version
            if not running:
                break
            await asyncio.sleep(0)  # a real reader does other work too
        print(
            f"child {args.child}: {snapshots} snapshots of versions {first}..{last}, "
            f"{retries} retries ({100 * retries / snapshots:.2f} %), {bad} inconsistent"
        )
        return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--children", type=int, default=2, help="reader processes")
    parser.add_argument("--seconds", type=float, default=1.0, help="how long to publish")
    parser.add_argument("--period", type=float, default=2.0, help="ms between versions")
    parser.add_argument(
        "--hold", type=float, default=0.5, help="ms each write is held open (0: one call)"
    )
    parser.add_argument("--latch", action="store_true", help="two copies: readers never wait")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per wait")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.children < 1 or args.seconds < 0 or args.period <= 0 or args.hold < 0:
        parser.error("--children must be >= 1, --seconds >= 0, --period > 0, --hold >= 0")
    side = child if args.child is not None else parent
    if args.loop == "uvloop":
        import uvloop

        return uvloop.run(side(args))
    return asyncio.run(side(args))


if __name__ == "__main__":
    sys.exit(main())
