#!/usr/bin/env python3
"""End-to-end benchmark of flannel-rs against its baselines, in one run on one
topology: two network namespaces joined through a bridge by veths (MTU 1500),
a real etcd, and for each case

  veth          the direct underlay (no tunnel): the physical limit here
  vxlan         kernel VXLAN between the two hosts (what flannel users pick)
  flannel-off   our daemon, --offload=off (batched recvmmsg/sendmmsg only)
  flannel-on    our daemon, --offload=auto (TUN TSO/GRO, UDP GSO/GRO)

  flannel-vxlan our daemon on both hosts in a network whose config says
                "Backend":{"Type":"vxlan"} (offloads on): ours <-> ours
  kernel-to-flannel-vxlan  h1 is a Go-flanneld-like kernel vxlan node
                (flannel.1, nolearning, static neighbour/FDB/route as flannel
                programs them), h2 runs our daemon; traffic kernel -> ours

  flannel-wg    our daemon on both hosts in a network whose config says
                "Backend":{"Type":"wireguard"} (offloads on): ours <-> ours
  wg-go-to-flannel-wg  h1 is a Go-flanneld-like wireguard node (Debian's
                wireguard-go on flannel-wg, programmed with `wg set` as
                flannel does), h2 runs our daemon; traffic wireguard-go -> ours
  wireguard-go  wireguard-go on both hosts, no flannel: the userspace
                WireGuard users would otherwise run
  boringtun     boringtun-cli on both hosts (when `boringtun-cli` is on PATH
                or in target/boringtun/bin: `cargo install boringtun-cli
                --root target/boringtun`)

  flannel-on-pmtu1400  flannel-on with a path MTU of 1400 to the peer
                (`ip route add <peer> dev eth0 mtu 1400` on both hosts), below
                the interface MTU: GSO sends are refused and resent as plain
                datagrams the kernel fragments

measures iperf3 TCP 1, 4 and 16 streams (Gbit/s), iperf3 UDP with 64-byte
payloads (received kpps), ping RTT p50/p99 without load, CPU seconds of the
whole machine per GB moved (from /proc/stat during the TCP 1-stream runs:
the tunnel's own CPU would hide the kernel's share, which VXLAN is all
of), and for our daemon its own CPU seconds per GB and peak RSS. Each
throughput figure is the median of --reps runs. Prints a table of ratios to
kernel VXLAN and writes target/e2e/results.{json,md} and ratios.svg.

Run as root via benches/e2e.sh (installs iperf3/etcd, builds the daemon).
Traffic stays inside the namespaces this script creates; they are removed on
exit, also on errors.
"""
import argparse, json, os, re, shutil, signal, statistics, subprocess, sys, tempfile, time

P = f"fe2e{os.getpid()}"
HUB, H1, H2 = f"{P}-hub", f"{P}-h1", f"{P}-h2"
EP = "http://192.168.77.254:2379"
procs, work = [], tempfile.mkdtemp(prefix="flannel-e2e.")


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


def nsx(ns, *args, **kw):
    return sh("ip", "netns", "exec", ns, *args, **kw)


def cleanup():
    for p in procs:
        if p.poll() is None:
            p.terminate()
    time.sleep(0.3)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for ns in (H1, H2, HUB):
        sh("ip", "netns", "del", ns, check=False)
    shutil.rmtree(work, ignore_errors=True)


def topology():
    sh("ip", "netns", "add", HUB)
    sh("ip", "-n", HUB, "link", "set", "lo", "up")
    sh("ip", "-n", HUB, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", HUB, "addr", "add", "192.168.77.254/24", "dev", "br0")
    sh("ip", "-n", HUB, "link", "set", "br0", "up")
    for i, ns in ((1, H1), (2, H2)):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", HUB, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", HUB, "link", "set", f"v{i}", "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"192.168.77.{i}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", "192.168.77.254")
        other = 3 - i
        sh("ip", "-n", ns, "link", "add", "vx0", "type", "vxlan", "id", "42", "remote",
           f"192.168.77.{other}", "dstport", "4789", "dev", "eth0")
        sh("ip", "-n", ns, "addr", "add", f"10.99.0.{i}/24", "dev", "vx0")
        sh("ip", "-n", ns, "link", "set", "vx0", "up")
    etcd = subprocess.Popen(
        ["ip", "netns", "exec", HUB, "etcd", "--name", "e2e", "--data-dir", f"{work}/etcd",
         "--listen-client-urls", EP, "--advertise-client-urls", EP,
         "--listen-peer-urls", "http://127.0.0.1:2380",
         "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
         "--initial-cluster", "e2e=http://127.0.0.1:2380"],
        stdout=open(f"{work}/etcd.log", "w"), stderr=subprocess.STDOUT)
    procs.append(etcd)
    ctl = ["ip", "netns", "exec", HUB, "env", "ETCDCTL_API=3", "etcdctl", f"--endpoints={EP}"]
    for _ in range(100):
        if subprocess.run(ctl + ["endpoint", "health"], capture_output=True).returncode == 0:
            break
        time.sleep(0.2)
    subprocess.run(ctl + ["put", "/coreos.com/network/config", UDP_CONFIG],
                   check=True, capture_output=True)


EXTRA = []  # --flannel-arg: extra daemon flags for every flannel case


UDP_CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}'
VXLAN_CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
WG_CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard"}}'
KERNEL_SUBNET = "10.5.200.0"


def etcdctl(*args):
    ctl = ["ip", "netns", "exec", HUB, "env", "ETCDCTL_API=3", "etcdctl", f"--endpoints={EP}"]
    return subprocess.run(ctl + list(args), check=True, capture_output=True, text=True).stdout


def start_flannel(binary, offload, hosts=((1, H1), (2, H2)), dev="flannel0"):
    daemons = []
    for i, ns in hosts:
        env_file = f"{work}/h{i}/subnet.env"
        log = open(f"{work}/flanneld-h{i}-{offload}.log", "w")
        p = subprocess.Popen(["ip", "netns", "exec", ns, binary, f"--etcd-endpoints={EP}",
                              f"--subnet-file={env_file}", f"--offload={offload}",
                              f"--wireguard-key-file={work}/h{i}/wgkey", *EXTRA],
                             stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        daemons.append(p)
    for i, ns in hosts:
        for _ in range(200):
            if "flannel" in sh("ip", "-n", ns, "route", "show", "10.5.0.0/16").stdout:
                break
            time.sleep(0.05)
        else:
            sys.exit(f"flanneld on h{i} did not come up; see {work}")
    addr = sh("ip", "-n", H2, "-4", "-o", "addr", "show", "dev", dev).stdout.split()[3].split("/")[0]
    return daemons, addr


def kernel_node(ns, ip, peer_ip, peer_addr, peer_mac):
    """Makes `ns` a kernel vxlan node as Go flanneld programs one: device,
    lease, and for the one peer a permanent neighbour, FDB entry and route."""
    mac = "0a:58:0a:05:c8:00"
    sh("ip", "-n", ns, "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", ip,
       "dev", "eth0", "nolearning", "dstport", "8472")
    sh("ip", "-n", ns, "link", "set", "flannel.1", "address", mac, "mtu", "1450", "up")
    sh("ip", "-n", ns, "addr", "add", f"{KERNEL_SUBNET}/32", "dev", "flannel.1")
    # A veth leaves checksums to be filled (CHECKSUM_PARTIAL) for the next
    # namespace; a userspace receiver needs them finished, as a real NIC does.
    nsx(ns, "ethtool", "-K", "eth0", "tx", "off")
    sh("ip", "-n", ns, "neigh", "replace", peer_addr, "lladdr", peer_mac, "dev", "flannel.1", "nud", "permanent")
    sh("bridge", "-n", ns, "fdb", "replace", peer_mac, "dev", "flannel.1", "dst", peer_ip, "self", "permanent")
    sh("ip", "-n", ns, "route", "replace", f"{peer_addr}/24", "via", peer_addr, "dev", "flannel.1", "onlink")


def wg(*args, stdin=None):
    return subprocess.run(["wg", *args], check=True, capture_output=True, text=True, input=stdin).stdout.strip()


def userspace_wg(ns, dev, cmd, addr, port=51820):
    """Runs a userspace WireGuard (`cmd` + device name) in `ns` with a new
    key, listening on `port`, `addr` on the device (MTU 1420); returns
    (process, public key). Device names must differ between namespaces:
    the UAPI sockets in /var/run/wireguard are shared."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd, dev], stdout=subprocess.DEVNULL,
                         stderr=open(f"{work}/{dev}.log", "w"), env={**os.environ, "WG_SUDO": "1"})
    procs.append(p)
    for _ in range(100):
        if subprocess.run(["wg", "show", dev], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    else:
        sys.exit(f"{cmd[0]} did not make {dev}; see {work}/{dev}.log")
    private = wg("genkey")
    with open(f"{work}/{dev}.key", "w") as f:
        f.write(private)
    wg("set", dev, "private-key", f"{work}/{dev}.key", "listen-port", str(port))
    sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
    sh("ip", "-n", ns, "link", "set", dev, "mtu", "1420", "up")
    return p, wg("pubkey", stdin=private)


def wg_pair(cmd, name):
    """`cmd` on both hosts, each the other's only peer; returns the daemons."""
    a, ka = userspace_wg(H1, f"{name}1", cmd, "10.98.0.1/24")
    b, kb = userspace_wg(H2, f"{name}2", cmd, "10.98.0.2/24")
    wg("set", f"{name}1", "peer", kb, "endpoint", "192.168.77.2:51820", "allowed-ips", "10.98.0.2/32")
    wg("set", f"{name}2", "peer", ka, "endpoint", "192.168.77.1:51820", "allowed-ips", "10.98.0.1/32")
    return [a, b]


def boringtun_cli():
    local = os.path.abspath("target/boringtun/bin/boringtun-cli")
    return shutil.which("boringtun-cli") or (local if os.path.exists(local) else None)


def kernel_node_down(ns):
    sh("ip", "-n", ns, "link", "del", "flannel.1", check=False)
    nsx(ns, "ethtool", "-K", "eth0", "tx", "on", check=False)


def lease_of(addr):
    return json.loads(etcdctl("get", "--print-value-only", f"/coreos.com/network/subnets/{addr}-24").strip())


def stop(daemons):
    for p in daemons:
        p.send_signal(signal.SIGTERM)
    for p in daemons:
        p.wait(timeout=10)


def iperf(dst, secs, args):
    nsx(H2, "iperf3", "-s", "-1", "-D", "-p", "5299")
    time.sleep(0.3)
    out = nsx(H1, "iperf3", "-c", dst, "-p", "5299", "-t", str(secs), "-J", *args, check=False).stdout
    try:
        return json.loads(out)["end"]
    except (ValueError, KeyError):
        return None


last_retransmits = [0]


def tcp(dst, secs, streams):
    end = iperf(dst, secs, ["-P", str(streams)])
    last_retransmits[0] = end["sum_sent"].get("retransmits", 0) if end else 0
    return (end["sum_received"]["bits_per_second"] / 1e9, end["sum_received"]["bytes"]) if end else (0.0, 0)


def udp64(dst, secs):
    end = iperf(dst, secs, ["-u", "-l", "64", "-b", "0"])
    if not end:
        return 0.0
    s = end["sum"]
    return (s["packets"] - s["lost_packets"]) / s["seconds"] / 1e3


def ping(dst, count):
    out = nsx(H1, "ping", "-c", str(count), "-i", "0.01", "-W", "1", dst, check=False).stdout
    rtts = sorted(float(m) for m in re.findall(r"time=([\d.]+) ms", out))
    if not rtts:
        return None, None
    pick = lambda q: rtts[min(len(rtts) - 1, int(q * len(rtts)))]
    return pick(0.50), pick(0.99)


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def machine_times():
    """(busy, idle) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(v[:8]) - idle) / hz, idle / hz


def profile(name, dst, args, pids):
    """One TCP stream under `perf record -a -g`: the machine's idle share,
    the top symbols (whole machine, and our daemons' threads), written to
    <out>/profile-<case>.txt."""
    os.makedirs(args.out, exist_ok=True)
    data = f"{work}/perf-{name}.data"
    b0, i0 = machine_times()
    rec = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "999", "-o", data, "--", "sleep", str(args.seconds)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gbps, _ = tcp(dst, args.seconds, 1)
    rec.wait()
    b1, i1 = machine_times()
    idle = (i1 - i0) / ((b1 - b0) + (i1 - i0))
    report = lambda *a: sh("perf", "report", "-i", data, "--no-children", "--percent-limit", "0.7",
                           "--stdio", "-g", "none", *a, check=False).stdout
    lines = [l for l in report("--sort", "sym").splitlines() if l.strip() and not l.startswith("#")]
    comms = [l for l in report("--sort", "comm").splitlines() if l.strip() and not l.startswith("#")]
    text = (f"{name}: TCP 1 stream {gbps:.2f} Gbit/s under perf; machine idle {idle:.1%}\n\nby command:\n"
            + "\n".join(comms[:12]) + "\n\nby symbol:\n" + "\n".join(lines[:30]) + "\n")
    # Where threads go to sleep: the context switches' stacks (off-CPU causes).
    sched = f"{work}/sched-{name}.data"
    rec = subprocess.Popen(["perf", "record", "-a", "-g", "-e", "sched:sched_switch", "-o", sched, "--",
                            "sleep", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tcp(dst, 3, 1)
    rec.wait()
    sw = sh("perf", "report", "-i", sched, "--no-children", "--stdio", "--sort", "comm,sym", "-g",
            "caller,0.5,callee,function,percent", "--percent-limit", "3", check=False).stdout
    text += "\ncontext switches (who sleeps, and where):\n" + "\n".join(
        l for l in sw.splitlines()[:120] if l.strip() and not l.startswith("#")) + "\n"
    with open(f"{args.out}/profile-{name}.txt", "w") as f:
        f.write(text)
    print(text, flush=True)


def machine_busy_seconds():
    """CPU seconds the whole machine spent not idle, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pids):
    worst = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    worst = max(worst, int(line.split()[1]) / 1024)
    return worst


def measure(name, dst, args, daemons=None):
    reps, secs = args.reps, args.seconds
    pids = [p.pid for p in daemons] if daemons else []
    ping(dst, 20)  # warm up ARP/neighbour entries and routes
    r = {"case": name}
    r["ping_p50_ms"], r["ping_p99_ms"] = ping(dst, args.pings)
    runs, cpu, machine, moved, retr = [], 0.0, 0.0, 0, []
    for _ in range(reps):
        c0 = cpu_seconds(pids) if pids else 0
        m0 = machine_busy_seconds()
        gbps, nbytes = tcp(dst, secs, 1)
        machine += machine_busy_seconds() - m0
        if pids:
            cpu += cpu_seconds(pids) - c0
        moved += nbytes
        runs.append(gbps)
        retr.append(last_retransmits[0])
    r["tcp1_gbps"] = statistics.median(runs)
    # TCP segments the sender had to resend: losses in the tunnel (a full
    # socket buffer or TUN queue) cut the congestion window and leave gaps.
    r["tcp1_retransmits"] = float(statistics.median(retr))
    r["machine_cpu_s_per_gb"] = machine / (moved / 1e9) if moved else None
    r["tcp4_gbps"] = statistics.median(tcp(dst, secs, 4)[0] for _ in range(reps))
    if not args.smoke:
        r["tcp16_gbps"] = statistics.median(tcp(dst, secs, 16)[0] for _ in range(reps))
    if not args.smoke:
        r["udp64_kpps"] = statistics.median(udp64(dst, secs) for _ in range(reps))
    if pids:
        r["cpu_s_per_gb"] = cpu / (moved / 1e9) if moved else None
        r["peak_rss_mb"] = peak_rss_mb(pids)
    if name in args.profile:
        profile(name, dst, args, pids)
    print(f"  {name:12s} " + " ".join(f"{k}={v:.3g}" for k, v in r.items()
                                        if isinstance(v, float)), flush=True)
    return r


METRICS = [("tcp1_gbps", "TCP 1 stream", "Gbit/s", True), ("tcp4_gbps", "TCP 4 streams", "Gbit/s", True),
           ("tcp16_gbps", "TCP 16 streams", "Gbit/s", True),
           ("udp64_kpps", "UDP 64 B", "kpps", True), ("ping_p50_ms", "ping p50", "ms", False),
           ("ping_p99_ms", "ping p99", "ms", False)]


def report(results, args):
    base = next((r for r in results if r["case"] == "vxlan"), None)
    lines = [f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.uname().nodename}: "
             f"`{' '.join(['benches/e2e.py'] + sys.argv[1:])}`.", "",
             f"Each case: median of {args.reps} x {args.seconds} s; ratio to kernel VXLAN in brackets "
             f"(higher is better for throughput, lower for ping). {os.cpu_count()} CPUs, kernel {os.uname().release}.",
             "", "| case | " + " | ".join(f"{t} ({u})" for _, t, u, _ in METRICS)
             + " | TCP 1 retransmits | machine CPU s/GB | daemon CPU s/GB | peak RSS MB |",
             "|---" * (len(METRICS) + 5) + "|"]
    for r in results:
        cells = []
        for key, _, _, _ in METRICS:
            v = r.get(key)
            if v is None:
                cells.append("–")
                continue
            b = base.get(key) if base else None
            cells.append(f"{v:.3g} ({v / b:.2f}×)" if b else f"{v:.3g}")
        retr = r.get("tcp1_retransmits")
        cells.append("–" if retr is None else f"{retr:.0f}")
        mcpu = r.get("machine_cpu_s_per_gb")
        b = base.get("machine_cpu_s_per_gb") if base else None
        cells.append(f"{mcpu:.2f} ({mcpu / b:.2f}×)" if mcpu and b else (f"{mcpu:.2f}" if mcpu else "–"))
        cpu = r.get("cpu_s_per_gb")
        rss = r.get("peak_rss_mb")
        cells.append(f"{cpu:.2f}" if cpu else "–")
        cells.append(f"{rss:.1f}" if rss else "–")
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    lines += wireguard_ratios(results)
    md = "\n".join(lines) + "\n"
    print("\n" + md)
    os.makedirs(args.out, exist_ok=True)
    with open(f"{args.out}/results.json", "w") as f:
        json.dump({"reps": args.reps, "seconds": args.seconds, "kernel": os.uname().release,
                   "cpus": os.cpu_count(), "results": results}, f, indent=2)
    with open(f"{args.out}/results.md", "w") as f:
        f.write(md)
    if base:
        with open(f"{args.out}/ratios.svg", "w") as f:
            f.write(svg(results, base))
    print(f"written: {args.out}/results.json results.md ratios.svg")


def wireguard_ratios(results):
    """Our wireguard backend's TCP streams against the faster userspace
    WireGuard of the same run and against our udp backend, as lines under
    the table."""
    by = {r["case"]: r for r in results}
    out = []
    for key, label in (("tcp1_gbps", "TCP 1"), ("tcp4_gbps", "TCP 4")):
        ours = by.get("flannel-wg", {}).get(key)
        if not ours:
            continue
        parts = []
        others = [(by[c][key], c) for c in ("wireguard-go", "boringtun") if by.get(c, {}).get(key)]
        if others:
            best, name = max(others)
            parts.append(f"{ours / best:.1f}× the faster userspace WireGuard ({name}, {best:.3g} Gbit/s)")
        if by.get("flannel-on", {}).get(key):
            parts.append(f"{ours / by['flannel-on'][key]:.2f}× our udp backend")
        if parts:
            out.append(f"flannel-wg {label}: " + ", ".join(parts) + ".")
    return [""] + out if out else []


def svg(results, base):
    """A grouped bar chart of throughput ratios to kernel VXLAN (1.0 = VXLAN)."""
    keys = [(k, t) for k, t, _, better in METRICS if better and all(k in r for r in results)]
    colors = ["#888888", "#4477aa", "#ee6677", "#228833", "#ccbb44"]
    w, h, left, top, bottom = 760, 320, 50, 30, 50
    vmax = max(max(r[k] / base[k] for r in results for k, _ in keys if base[k]), 1.2)
    plot_h = h - top - bottom
    group_w = (w - left - 20) / max(len(keys), 1)
    bar_w = group_w * 0.8 / len(results)
    y = lambda v: top + plot_h * (1 - v / vmax)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="18" font-size="13">Throughput relative to kernel VXLAN (1.0 = VXLAN)</text>',
           f'<line x1="{left}" y1="{y(1):.1f}" x2="{w - 10}" y2="{y(1):.1f}" stroke="#000" stroke-dasharray="4"/>']
    for tick in [0, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8]:
        if tick <= vmax:
            out.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick}</text>')
    for gi, (k, title) in enumerate(keys):
        gx = left + gi * group_w + group_w * 0.1
        for ci, r in enumerate(results):
            v = r[k] / base[k] if base[k] else 0
            x = gx + ci * bar_w
            out.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bar_w - 2:.1f}" height="{y(0) - y(v):.1f}" '
                       f'fill="{colors[ci % len(colors)]}"><title>{r["case"]}: {v:.2f}</title></rect>')
            out.append(f'<text x="{x + bar_w / 2:.1f}" y="{y(v) - 3:.1f}" text-anchor="middle">{v:.2f}</text>')
        out.append(f'<text x="{gx + group_w * 0.4:.1f}" y="{h - bottom + 16}" text-anchor="middle">{title}</text>')
    for ci, r in enumerate(results):
        x = left + ci * 140
        out.append(f'<rect x="{x}" y="{h - 18}" width="10" height="10" fill="{colors[ci % len(colors)]}"/>'
                   f'<text x="{x + 14}" y="{h - 9}">{r["case"]}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="flanneld binary")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument("--out", default="target/e2e")
    ap.add_argument("--smoke", action="store_true", help="CI: vxlan and flannel-on only, 1 s, one rep")
    ap.add_argument("--flannel-arg", action="append", default=[], help="extra flanneld flag (repeatable)")
    ap.add_argument("--profile", default="", help="comma-separated cases to profile with perf "
                    "(one more TCP stream each; report in <out>/profile-<case>.txt)")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=BIN",
                    help="also run flannel-on (and flannel-wg, when chosen) with another flanneld build, "
                    "as case flannel-on@NAME "
                    "(a before/after in one run; repeatable)")
    ap.add_argument("--cases", default="", help="comma-separated subset: veth,vxlan,flannel-off,flannel-on,"
                    "flannel-vxlan,kernel-to-flannel-vxlan,flannel-wg,wg-go-to-flannel-wg,wireguard-go,boringtun,"
                    "flannel-on-pmtu1400")
    args = ap.parse_args()
    EXTRA.extend(args.flannel_arg)
    args.profile = [c for c in args.profile.split(",") if c]
    want = lambda c: not args.cases or c in args.cases.split(",")
    if args.smoke:
        args.reps, args.seconds, args.pings = 1, 1, 20
    try:
        topology()
        results = []
        if not args.smoke and want("veth"):
            results.append(measure("veth", "192.168.77.2", args))
        if want("vxlan"):
            results.append(measure("vxlan", "10.99.0.2", args))
        modes = ["auto"] if args.smoke else ["off", "auto"]
        for mode in modes:
            name = "flannel-on" if mode == "auto" else "flannel-off"
            if not want(name):
                continue
            daemons, addr = start_flannel(args.bin, mode)
            results.append(measure(name, addr, args, daemons))
            stop(daemons)
        for spec in args.compare:
            label, _, binary = spec.partition("=")
            daemons, addr = start_flannel(binary, "auto")
            results.append(measure(f"flannel-on@{label}", addr, args, daemons))
            stop(daemons)
        if want("flannel-vxlan") or want("kernel-to-flannel-vxlan"):
            etcdctl("put", "/coreos.com/network/config", VXLAN_CONFIG)
            if want("flannel-vxlan"):
                daemons, addr = start_flannel(args.bin, "auto", dev="flannel.1")
                results.append(measure("flannel-vxlan", addr, args, daemons))
                stop(daemons)
            if want("kernel-to-flannel-vxlan"):
                value = json.dumps({"PublicIP": "192.168.77.1", "PublicIPv6": None, "BackendType": "vxlan",
                                    "BackendData": {"VNI": 1, "VtepMAC": "0a:58:0a:05:c8:00"}})
                etcdctl("put", f"/coreos.com/network/subnets/{KERNEL_SUBNET}-24", value)
                daemons, addr = start_flannel(args.bin, "auto", hosts=((2, H2),), dev="flannel.1")
                mac = lease_of(addr)["BackendData"]["VtepMAC"]
                kernel_node(H1, "192.168.77.1", "192.168.77.2", addr, mac)
                try:
                    results.append(measure("kernel-to-flannel-vxlan", addr, args, daemons))
                finally:
                    stop(daemons)
                    kernel_node_down(H1)
                    etcdctl("del", f"/coreos.com/network/subnets/{KERNEL_SUBNET}-24")
            etcdctl("put", "/coreos.com/network/config", UDP_CONFIG)
        if want("flannel-wg") or want("wg-go-to-flannel-wg"):
            etcdctl("put", "/coreos.com/network/config", WG_CONFIG)
            if want("flannel-wg"):
                daemons, addr = start_flannel(args.bin, "auto", dev="flannel-wg")
                results.append(measure("flannel-wg", addr, args, daemons))
                stop(daemons)
                for spec in args.compare:
                    label, _, binary = spec.partition("=")
                    daemons, addr = start_flannel(binary, "auto", dev="flannel-wg")
                    results.append(measure(f"flannel-wg@{label}", addr, args, daemons))
                    stop(daemons)
            if want("wg-go-to-flannel-wg"):
                ref, key = userspace_wg(H1, "flannel-wg", ["wireguard-go", "-f"], f"{KERNEL_SUBNET}/16")
                value = json.dumps({"PublicIP": "192.168.77.1", "PublicIPv6": None, "BackendType": "wireguard",
                                    "BackendData": {"PublicKey": key, "Port": 51820}})
                etcdctl("put", f"/coreos.com/network/subnets/{KERNEL_SUBNET}-24", value)
                daemons, addr = start_flannel(args.bin, "auto", hosts=((2, H2),), dev="flannel-wg")
                ours = lease_of(addr)["BackendData"]["PublicKey"]
                wg("set", "flannel-wg", "peer", ours, "endpoint", "192.168.77.2:51820", "allowed-ips", f"{addr}/24")
                try:
                    results.append(measure("wg-go-to-flannel-wg", addr, args, daemons + [ref]))
                finally:
                    stop(daemons + [ref])
                    etcdctl("del", f"/coreos.com/network/subnets/{KERNEL_SUBNET}-24")
            etcdctl("put", "/coreos.com/network/config", UDP_CONFIG)
        if not args.smoke and want("wireguard-go"):
            daemons = wg_pair(["wireguard-go", "-f"], "wgg")
            results.append(measure("wireguard-go", "10.98.0.2", args, daemons))
            stop(daemons)
        if not args.smoke and want("boringtun"):
            cli = boringtun_cli()
            if cli:
                daemons = wg_pair([cli, "-f", "--disable-drop-privileges"], "btn")
                results.append(measure("boringtun", "10.98.0.2", args, daemons))
                stop(daemons)
            else:
                print("  boringtun    skipped: no boringtun-cli (cargo install boringtun-cli --root target/boringtun)")
        if not args.smoke and want("flannel-on-pmtu1400"):
            daemons, addr = start_flannel(args.bin, "auto")
            for ns, peer in ((H1, "192.168.77.2"), (H2, "192.168.77.1")):
                sh("ip", "-n", ns, "route", "add", peer, "dev", "eth0", "mtu", "1400")
            results.append(measure("flannel-on-pmtu1400", addr, args, daemons))
            stop(daemons)
            for ns, peer in ((H1, "192.168.77.2"), (H2, "192.168.77.1")):
                sh("ip", "-n", ns, "route", "del", peer, "dev", "eth0")
        report(results, args)
        if args.smoke and not all(r.get("tcp1_gbps", 0) > 0 for r in results):
            sys.exit("smoke: a case moved no data")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
