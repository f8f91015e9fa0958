//! The data path on a real-world underlay: small TCP segments (a small
//! MSS makes TSO super-packets of hundreds of segments), and a path MTU
//! below the interface MTU. Both offload modes; correctness, not speed
//! (the figures are printed).

mod support;

use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

const MODES: [&str; 2] = ["--offload=auto", "--offload=off"];
const PORT: u16 = 9116;

/// Runs iperf3 from host `from` to host `to`'s overlay address for `bytes`
/// with `args`; returns (success, receiver Gbit/s, output).
fn iperf(bed: &Bed, from: usize, to: usize, bytes: &str, args: &[&str]) -> (bool, f64, String) {
    let ns_to = bed.ns(to);
    let server = Command::new("ip")
        .args(["netns", "exec", &ns_to, "iperf3", "-s", "-1", "-p", "5301"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut server = ChildGuard(server);
    let dst = bed.tun_addr(to).to_string();
    // The server needs a moment to listen: retry the connection, not sleep.
    let out = wait_for("iperf3 to connect", Duration::from_secs(10), || {
        let out = Command::new("timeout")
            .args([
                "60",
                "ip",
                "netns",
                "exec",
                &bed.ns(from),
                "iperf3",
                "-c",
                &dst,
                "-p",
                "5301",
                "-n",
                bytes,
                "-f",
                "g",
            ])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if text.contains("unable to connect") || text.contains("Connection refused") {
            return None;
        }
        Some((out.status.success(), text))
    });
    let _ = server.0.wait();
    let gbit = out
        .1
        .lines()
        .find(|l| l.contains("receiver"))
        .and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "Gbits/sec")?;
            w[i - 1].parse().ok()
        })
        .unwrap_or(0.0);
    (out.0, gbit, out.1)
}

/// Kills a child on drop (an iperf3 server left by a failed test).
struct ChildGuard(std::process::Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn drops(bed: &Bed, i: usize, dir: &str, reason: &str) -> u64 {
    let m = http_get(&bed.ns(i), PORT, "/metrics").expect("metrics").1;
    metric(
        &m,
        &format!(r#"flannel_dropped_packets_total{{direction="{dir}",reason="{reason}"}}"#),
    )
}

#[test]
fn small_tcp_segments_are_carried_in_both_modes() {
    let _heavy = heavy();
    let port = format!("--healthz-port={PORT}");
    for mode in MODES {
        let mut bed = two_hosts(&[mode, &port]);
        for mss in ["88", "200", "536"] {
            let t = Instant::now();
            let (ok, gbit, out) = iperf(&bed, 0, 1, "8M", &["-M", mss]);
            assert!(ok, "{mode} -M {mss}: iperf3 failed:\n{out}");
            println!(
                "{mode} MSS {mss}: 8 MB in {:?} ({gbit} Gbit/s)",
                t.elapsed()
            );
            for i in 0..2 {
                for dir in ["egress", "ingress"] {
                    for reason in ["malformed", "send_error", "tun_write_error"] {
                        assert_eq!(
                            drops(&bed, i, dir, reason),
                            0,
                            "{mode} -M {mss}: h{i} {dir} {reason}"
                        );
                    }
                }
            }
        }
        for i in 0..2 {
            assert!(bed.is_running(i), "{mode}: h{i} died");
        }
    }
}

/// How the path to the peer gets its smaller MTU.
#[derive(Debug, Clone, Copy)]
enum SmallPath {
    /// `ip route add <peer> dev eth0 mtu 1400`
    RouteMtu,
    /// `ip route add <peer> dev eth0 mtu lock 1400`
    RouteMtuLock,
    /// An ICMP "fragmentation needed" (next-hop MTU 1400) about our own
    /// tunnel datagrams, sent from the hub, as a router on the path would.
    FragNeeded,
}

/// ICMP type 3 code 4 (next-hop MTU `mtu`) quoting a UDP datagram of the
/// tunnel from `src`:8285 to `dst`:8285.
fn frag_needed(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, mtu: u16) -> Vec<u8> {
    let mut p = vec![0u8; 8 + 20 + 8];
    p[0] = 3;
    p[1] = 4;
    p[6..8].copy_from_slice(&mtu.to_be_bytes());
    let q = &mut p[8..28];
    q[0] = 0x45;
    q[2..4].copy_from_slice(&1500u16.to_be_bytes());
    q[6] = 0x40; // DF
    q[8] = 64;
    q[9] = 17;
    q[12..16].copy_from_slice(&src.octets());
    q[16..20].copy_from_slice(&dst.octets());
    let ck = flannel::wire::checksum(q);
    q[10..12].copy_from_slice(&ck.to_be_bytes());
    p[28..30].copy_from_slice(&8285u16.to_be_bytes());
    p[30..32].copy_from_slice(&8285u16.to_be_bytes());
    p[32..34].copy_from_slice(&1480u16.to_be_bytes());
    let ck = flannel::wire::checksum(&p);
    p[2..4].copy_from_slice(&ck.to_be_bytes());
    p
}

/// Sends `icmp` from the hub's namespace to `to` through a raw socket.
fn send_icmp_from_hub(bed: &Bed, to: std::net::Ipv4Addr, icmp: Vec<u8>) {
    in_ns(&bed.hub.clone(), move || {
        // SAFETY: a raw ICMP socket; the kernel adds the IP header.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(to).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid buffer and address for the call.
        let rc = unsafe {
            libc::sendto(
                fd,
                icmp.as_ptr().cast(),
                icmp.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert_eq!(
            rc,
            icmp.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
    })
}

/// 16 MB of TCP from h`a` to h`b` through the tunnel, checked byte for
/// byte (`what` names the case); returns the seconds it took and the IP
/// fragments h`a`'s kernel made of its datagrams meanwhile.
fn transfer_counting_fragments(bed: &Bed, a: usize, b: usize, seed: u64, what: &str) -> (f64, u64) {
    let data = pattern(16 << 20, seed);
    let frags_before = nstat(&bed.ns(a), "IpFragCreates");
    let t = Instant::now();
    let got = tcp_transfer(bed, a, b, data.clone());
    let secs = t.elapsed().as_secs_f64();
    let frags = nstat(&bed.ns(a), "IpFragCreates") - frags_before;
    assert!(
        got == data,
        "{what}: 16 MB h{a} -> h{b} corrupted or short ({} bytes)",
        got.len()
    );
    (secs, frags)
}

/// The path MTU each host has cached towards the other, from `ip route get`.
fn cached_mtu(bed: &Bed, from: usize, to: usize) -> String {
    sh(&[
        "ip",
        "-n",
        &bed.ns(from),
        "route",
        "get",
        &bed.hosts[to].ip.to_string(),
    ])
}

#[test]
fn bulk_tcp_crosses_a_path_mtu_below_the_interface_mtu() {
    let _heavy = heavy();
    let port = format!("--healthz-port={PORT}");
    for case in [
        SmallPath::RouteMtu,
        SmallPath::RouteMtuLock,
        SmallPath::FragNeeded,
    ] {
        for mode in MODES {
            let bed = two_hosts(&[mode, &port]);
            for (a, b) in [(0, 1), (1, 0)] {
                let peer = bed.hosts[b].ip.to_string();
                let ns_a = bed.ns(a);
                match case {
                    SmallPath::RouteMtu | SmallPath::RouteMtuLock => {
                        let lock = matches!(case, SmallPath::RouteMtuLock);
                        let mut args = vec!["ip", "-n", &ns_a, "route", "add", &peer];
                        args.extend(["dev", "eth0", "mtu"]);
                        args.extend(lock.then_some("lock"));
                        args.push("1400");
                        sh(&args);
                    }
                    SmallPath::FragNeeded => {
                        send_icmp_from_hub(
                            &bed,
                            bed.hosts[a].ip,
                            frag_needed(bed.hosts[a].ip, bed.hosts[b].ip, 1400),
                        );
                        let (ns, p) = (bed.ns(a), peer.clone());
                        wait_for("the path MTU to be learned", Duration::from_secs(5), || {
                            sh(&["ip", "-n", &ns, "route", "get", &p])
                                .contains("mtu 1400")
                                .then_some(())
                        });
                    }
                }
            }
            for (a, b) in [(0, 1), (1, 0)] {
                let what = format!("{case:?} {mode}");
                let (secs, frags) = transfer_counting_fragments(&bed, a, b, 21 + a as u64, &what);
                println!(
                    "{case:?} {mode}: 16 MB h{a} -> h{b} intact in {secs:.2} s ({:.2} Gbit/s), {frags} IP fragments made by h{a}; route: {}",
                    16.0 * 8.0 * 1.048576 / 1000.0 / secs,
                    cached_mtu(&bed, a, b).lines().next().unwrap_or("")
                );
                if mode == "--offload=auto" {
                    // TCP is cut to the path: only what went out before the
                    // refusal taught the path MTU is fragmented, not each of
                    // the ~12 000 segments (two fragments each).
                    assert!(
                        frags < 1000,
                        "{case:?}: h{a} fragmented {frags} datagrams of a bulk TCP transfer: segments are not cut to the path MTU"
                    );
                }
            }
            if matches!(case, SmallPath::RouteMtu) && mode == "--offload=auto" {
                // The path narrows further: the next refusal is followed.
                for (a, b) in [(0, 1), (1, 0)] {
                    let peer = bed.hosts[b].ip.to_string();
                    let ns_a = bed.ns(a);
                    sh(&[
                        "ip", "-n", &ns_a, "route", "change", &peer, "dev", "eth0", "mtu", "1300",
                    ]);
                }
                for (a, b) in [(0, 1), (1, 0)] {
                    let (_, frags) =
                        transfer_counting_fragments(&bed, a, b, 31 + a as u64, "mtu 1300");
                    println!("{case:?} {mode}: path narrowed to 1300, 16 MB h{a} -> h{b} intact, {frags} IP fragments made by h{a}");
                    assert!(
                        frags < 1000,
                        "h{a} fragmented {frags} datagrams after the path narrowed to 1300"
                    );
                }
            }
            for i in 0..2 {
                let m = http_get(&bed.ns(i), PORT, "/metrics").expect("metrics").1;
                let fallbacks = metric(&m, "flannel_gso_fallbacks_total");
                let off = metric(&m, "flannel_gso_off_peers");
                let send_errors = metric(
                    &m,
                    r#"flannel_dropped_packets_total{direction="egress",reason="send_error"}"#,
                );
                println!("{case:?} {mode}: h{i} gso_fallbacks={fallbacks} gso_off_peers={off} send_errors={send_errors}");
                assert_eq!(
                    send_errors, 0,
                    "{case:?} {mode}: h{i} lost datagrams to send errors"
                );
                if mode == "--offload=auto" {
                    // The refused GSO sends were resent, and the peer remembered.
                    assert!(fallbacks >= 1, "{case:?}: h{i} never fell back from GSO");
                    assert!(
                        off >= 1,
                        "{case:?}: h{i} keeps no GSO-off entry for its peer"
                    );
                } else {
                    assert_eq!(
                        (fallbacks, off),
                        (0, 0),
                        "{case:?}: no GSO with offloads off"
                    );
                }
            }
        }
    }
}

/// The TUN deleted under the daemon: no busy loop on a dead descriptor,
/// no half-dead daemon answering probes. It exits non-zero, promptly, saying
/// why, so its supervisor restarts it (and it cleans up what it can).
#[test]
fn a_tun_deleted_under_the_daemon_makes_it_exit_non_zero() {
    for mode in MODES {
        let mut bed = Bed::new(1);
        bed.start_ready_with(0, &[mode]);
        let t = Instant::now();
        sh(&["ip", "-n", &bed.ns(0), "link", "del", "flannel0"]);
        let status = wait_for("the daemon to exit", Duration::from_secs(10), || {
            bed.exit_status(0)
        });
        println!(
            "{mode}: TUN deleted, daemon exited {status} after {:?}",
            t.elapsed()
        );
        assert!(!status.success(), "{mode}: exit status {status}");
        let log = bed.log(0);
        assert!(log.contains("data path failed"), "{mode}: {log}");
        assert!(log.contains("reading the TUN"), "{mode}: {log}");
    }
}

/// A plain UDP socket on 8285 in a bed host's namespace, as a Go flanneld
/// node's is: it forwards whatever arrives to `to` and ignores where from,
/// and notes the source ports of what came from `watch`.
struct Relay {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ports: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<u16>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(bed: &Bed, host: usize, watch: std::net::Ipv4Addr, to: std::net::Ipv4Addr) -> Relay {
        use std::net::UdpSocket;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let sock = in_ns(&bed.ns(host), || UdpSocket::bind("0.0.0.0:8285").unwrap());
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let ports = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let thread = {
            let (stop, ports) = (stop.clone(), ports.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    if from.ip() == std::net::IpAddr::V4(watch) {
                        ports.lock().unwrap().insert(from.port());
                    }
                    sock.send_to(&buf[..n], (to, 8285)).unwrap();
                }
            })
        };
        Relay {
            stop,
            ports,
            thread: Some(thread),
        }
    }

    /// Stops forwarding; the source ports seen from `watch`.
    fn finish(mut self) -> std::collections::BTreeSet<u16> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.ports.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// 16 TCP transfers from `from` to `to` at once, each compared byte for byte.
fn sixteen_concurrent_transfers(bed: &Bed, from: usize, to: usize, what: &str) {
    let (src, dst, addr) = (bed.ns(from), bed.ns(to), bed.tun_addr(to));
    std::thread::scope(|s| {
        let all: Vec<_> = (0..16)
            .map(|k| {
                let (src, dst) = (src.clone(), dst.clone());
                s.spawn(move || {
                    let data = pattern(1 << 20, k);
                    (tcp_between(&src, &dst, addr, data.clone()) == data, k)
                })
            })
            .collect();
        for t in all {
            let (ok, k) = t.join().unwrap();
            assert!(ok, "{what}: transfer {k}");
        }
    });
}

/// 16 TCP transfers from `from` to `to`, each compared byte for byte.
fn sixteen_transfers(bed: &Bed, from: usize, to: usize, what: &str) {
    for k in 0..16 {
        let data = pattern(256 << 10, k);
        assert!(
            tcp_transfer(bed, from, to, data.clone()) == data,
            "{what}: transfer {k}"
        );
    }
}

/// h0 (two workers) sends to h1 through a relay that is a plain UDP socket
/// on 8285, as a Go flanneld node is: it forwards whatever arrives and
/// ignores where from. With `per-worker` source ports h0's flows leave from
/// 8286 and 8287 (entropy for the receiver's SO_REUSEPORT group), with
/// `fixed` from 8285 only; the destination is 8285 either way, and every
/// transfer arrives intact through the plain receiver.
#[test]
fn flows_carry_source_port_entropy_and_a_plain_8285_receiver_takes_them() {
    use std::collections::BTreeSet;
    let _heavy = heavy();
    for (flag, want) in [
        (
            "--udp-source-ports=per-worker",
            BTreeSet::from([8286u16, 8287]),
        ),
        ("--udp-source-ports=fixed", BTreeSet::from([8285u16])),
    ] {
        let mut bed = Bed::new(3);
        let relay_ip = bed.hosts[2].ip;
        let (h0_ip, h1_ip) = (bed.hosts[0].ip, bed.hosts[1].ip);
        bed.start_ready_with(0, &["--workers=2", flag, "--accept-unknown-peers"]);
        bed.start_ready_with(
            1,
            &[
                "--workers=1",
                "--accept-unknown-peers",
                &format!("--public-ip={relay_ip}"),
            ],
        );
        let relay = Relay::start(&bed, 2, h0_ip, h1_ip);
        let dst = bed.tun_addr(1);
        wait_for(
            "h0 -> h1 through the plain relay",
            Duration::from_secs(10),
            || bed.ping(0, dst).then_some(()),
        );
        // 16 connections: each hashes to one of h0's two workers (their
        // ACKs are steered by flow), so both carry some (all on one: a
        // 2^-15 chance).
        sixteen_transfers(&bed, 0, 1, flag);
        let seen = relay.finish();
        println!("{flag}: h0's datagrams came from ports {seen:?}");
        assert_eq!(seen, want, "{flag}");
    }
}

/// A sender with one source port (h0 with one worker, as every Go flanneld
/// sends from 8285) to h1 with two workers, on udp and on vxlan. By the
/// outer addresses and ports every datagram would go to one of h1's
/// workers; h1's reuseport group steers each by its inner flow instead (no
/// warning in its log), so with 16 TCP flows at once both workers receive
/// (`flannel_worker_received_datagrams`; all on one: a 2^-15 chance), and
/// each transfer arrives intact. Where each datagram lands is checked
/// against the kernel in `datapath::udp`'s unit tests.
#[test]
fn a_receiver_spreads_one_senders_flows_over_its_workers() {
    const P: u16 = 9131;
    let _heavy = heavy();
    for backend in ["udp", "vxlan"] {
        let mut bed = if backend == "vxlan" {
            bed_with(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#, 2)
        } else {
            Bed::new(2)
        };
        bed.start_ready_with(0, &["--workers=1"]);
        bed.start_ready_with(1, &["--workers=2", &format!("--healthz-port={P}")]);
        let dst = bed.tun_addr(1);
        wait_for(
            &format!("{backend}: h0 -> h1"),
            Duration::from_secs(10),
            || bed.ping(0, dst).then_some(()),
        );
        sixteen_concurrent_transfers(&bed, 0, 1, backend);
        let text = scrape(&bed, 1, P);
        let per_worker: Vec<u64> = (0..2)
            .map(|k| {
                let key = format!("flannel_worker_received_datagrams_total{{worker=\"{k}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(key.as_str()))
                    .unwrap_or_else(|| panic!("{backend}: no {key}in {text}"))
                    .trim()
                    .parse()
                    .unwrap()
            })
            .collect();
        println!("{backend}: datagrams received by h1's workers: {per_worker:?}");
        // A 1 MB flow is ~700 datagrams: each worker took at least one flow.
        assert!(
            per_worker.iter().all(|&n| n >= 500),
            "{backend}: {per_worker:?}"
        );
        let log = bed.log(1);
        assert!(
            !log.contains("steering received datagrams"),
            "{backend}: {log}"
        );
    }
}

/// `--worker-threads=combined` (one thread polling the TUN and the socket):
/// the same traffic arrives intact in both offload modes.
#[test]
fn both_thread_layouts_carry_traffic_and_idle_without_spinning() {
    let _heavy = heavy();
    // The default (one thread per worker polling both descriptors, with a
    // busy-poll window after traffic) and the split layout without one.
    let layouts: [(&[&str], &str, &str); 2] = [
        (&["--busy-poll=200us"], "worker-0", "tun-to-udp"),
        (
            &["--worker-threads=split", "--busy-poll=0"],
            "tun-to-udp-0",
            "worker-0",
        ),
    ];
    for mode in MODES {
        for (flags, has, lacks) in layouts {
            let mut args = vec![mode];
            args.extend_from_slice(flags);
            let bed = two_hosts(&args);
            for (a, b) in [(0, 1), (1, 0)] {
                let data = pattern(8 << 20, 40 + a as u64);
                assert!(
                    tcp_transfer(&bed, a, b, data.clone()) == data,
                    "{mode} {flags:?}: h{a} -> h{b}"
                );
            }
            let pid = bed.daemon_pid(0);
            let threads = sh(&["ps", "-T", "-o", "comm=", "-p", &pid.to_string()]);
            assert!(threads.contains(has), "{flags:?}: {threads}");
            assert!(!threads.contains(lacks), "{flags:?}: {threads}");
            // Traffic over: the window closes and the threads sleep. A
            // spinning thread would burn the whole second.
            std::thread::sleep(Duration::from_millis(300));
            let before = cpu_ticks(pid);
            std::thread::sleep(Duration::from_secs(1));
            let used = cpu_ticks(pid) - before;
            assert!(
                used < 30,
                "{mode} {flags:?}: {used} CPU ticks (1/100 s) in an idle second"
            );
        }
    }
}

/// utime + stime of a process, in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5): the 12th and 13th after the state.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The wireguard backend over a path MTU below the interface MTU: its TCP
/// is cut to the path as the udp backend's is (each sealed datagram is the
/// segment plus 32 bytes), so a bulk transfer is not fragmented.
#[test]
fn wireguard_bulk_tcp_fits_a_path_mtu_below_the_interface_mtu() {
    let _heavy = heavy();
    let cfg = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard"}}"#;
    let mut bed = bed_with(cfg, 2);
    bed.start_ready(0);
    bed.start_ready(1);
    for (a, b) in [(0, 1), (1, 0)] {
        let peer = bed.hosts[b].ip.to_string();
        sh(&[
            "ip",
            "-n",
            &bed.ns(a),
            "route",
            "add",
            &peer,
            "dev",
            "eth0",
            "mtu",
            "1400",
        ]);
    }
    let dst = bed.tun_addr(1);
    wait_for("h0 -> h1 over wireguard", Duration::from_secs(15), || {
        bed.ping(0, dst).then_some(())
    });
    for (a, b) in [(0, 1), (1, 0)] {
        let (_, frags) = transfer_counting_fragments(&bed, a, b, 41 + a as u64, "wireguard");
        println!("wireguard: 16 MB h{a} -> h{b} intact, {frags} IP fragments made by h{a}");
        assert!(
            frags < 1000,
            "wireguard: h{a} fragmented {frags} datagrams of a bulk TCP transfer"
        );
    }
}
