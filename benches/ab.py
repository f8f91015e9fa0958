#!/usr/bin/env python3
"""Paired A/B of two flanneld builds (or flag sets) on one TCP stream (or --streams N).

On a shared 2-vCPU machine one build's throughput drifts ±15 % between runs
of e2e.py, which runs each case to the end before the next: a 5 % change is
invisible. This runs the two side by side instead, on the topology e2e.py
builds (two namespaced hosts, a bridge, a real etcd): for each pair it
starts A, moves one TCP stream for --seconds, stops it, does the same for B,
and alternates the order (AB, BA, AB, …) so a drift of the machine falls on
both. It reports, per build, the median Gbit/s and the machine's busy CPU
seconds per GB moved (from /proc/stat) and the ping RTT p50 without load
(100 pings before the stream), and the median of the per-pair ratios B/A,
with how many pairs B won on throughput.

A "build" is a path to a flanneld binary, optionally followed by flags:
    benches/ab.py --backend wireguard \\
        --a target/release/flanneld --b "target/release/flanneld --busy-poll=0"

Run as root (network namespaces, TUN). Cleans up on exit, also on errors.
"""
import argparse, shlex, statistics, sys

sys.dont_write_bytecode = True  # importing e2e leaves no __pycache__ in the tree

import e2e


def trial(cmd, dev, secs, streams):
    e2e.EXTRA[:] = cmd[1:]
    daemons, addr = e2e.start_flannel(cmd[0], "auto", dev=dev)
    try:
        e2e.ping(addr, 5)
        p50, _ = e2e.ping(addr, 100)
        m0 = e2e.machine_busy_seconds()
        gbps, nbytes = e2e.tcp(addr, secs, streams)
        busy = e2e.machine_busy_seconds() - m0
    finally:
        e2e.stop(daemons)
    return gbps, (busy / (nbytes / 1e9) if nbytes else float("nan")), p50 or float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="baseline: binary [flags]")
    ap.add_argument("--b", required=True, help="candidate: binary [flags]")
    ap.add_argument("--backend", default="udp", choices=["udp", "wireguard"])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--streams", type=int, default=1, help="parallel TCP streams per trial")
    args = ap.parse_args()
    builds = {"A": shlex.split(args.a), "B": shlex.split(args.b)}
    dev = "flannel0" if args.backend == "udp" else "flannel-wg"
    got = {"A": [], "B": []}
    try:
        e2e.topology()
        if args.backend == "wireguard":
            e2e.etcdctl("put", "/coreos.com/network/config", e2e.WG_CONFIG)
        for i in range(args.pairs):
            order = "AB" if i % 2 == 0 else "BA"
            for k in order:
                got[k].append(trial(builds[k], dev, args.seconds, args.streams))
            a, b = got["A"][-1], got["B"][-1]
            print(f"pair {i + 1}: A {a[0]:.2f} Gbit/s {a[1]:.2f} s/GB {a[2]:.3f} ms   "
                  f"B {b[0]:.2f} Gbit/s {b[1]:.2f} s/GB {b[2]:.3f} ms", flush=True)
    finally:
        e2e.cleanup()
    med = lambda k, j: statistics.median(x[j] for x in got[k])
    ratios = [b[0] / a[0] for a, b in zip(got["A"], got["B"]) if a[0] > 0]
    cpu = [b[1] / a[1] for a, b in zip(got["A"], got["B"]) if a[1] > 0]
    lat = [b[2] / a[2] for a, b in zip(got["A"], got["B"]) if a[2] > 0]
    wins = sum(r > 1 for r in ratios)
    print(f"\n{args.backend}, {args.pairs} pairs of {args.seconds} s, TCP {args.streams} stream(s)")
    for k, build in (("A", args.a), ("B", args.b)):
        print(f"{k}  {med(k, 0):.2f} Gbit/s  {med(k, 1):.2f} machine CPU s/GB  ping p50 {med(k, 2):.3f} ms   {build}")
    print(f"B/A: throughput {statistics.median(ratios):.3f}× (B faster in {wins} of {len(ratios)} pairs), "
          f"CPU per GB {statistics.median(cpu):.3f}×, ping p50 {statistics.median(lat):.3f}×")


if __name__ == "__main__":
    sys.exit(main())
