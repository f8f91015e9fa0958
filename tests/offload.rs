//! The fast path with offloads on and off: data intact, the wire unchanged
//! (one ordinary, checksum-correct IPv4 packet of at most the MTU per
//! datagram), and peers with different modes interoperate.

mod support;

use flannel::wire::{fold, pseudo_header_sum, sum, Ipv4Packet};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::*;

const MODES: [&str; 2] = ["--offload=auto", "--offload=off"];

/// At most this many datagrams are in flight: no queue on the way (TUN
/// rings of 500, socket buffers of MBs, the veth backlog of 1000) can
/// overflow, so every datagram must arrive and a loss is a bug.
const WINDOW: usize = 32;

/// Sends `n` datagrams of `size` bytes (sequence number + pattern) from
/// host `from` to `dst:6000` on host `to`, with UDP GSO (`UDP_SEGMENT`, 16
/// datagrams per send) when `gso`, so the kernel hands the TUN UDP
/// super-packets. The sender keeps at most [`WINDOW`] datagrams in flight,
/// waiting for the receiver to count them (up to 2 s per window, after
/// which it goes on: the loss then shows in the result). Returns how many
/// distinct datagrams arrived, each checked intact.
fn udp_flood(bed: &Bed, from: usize, to: usize, n: usize, size: usize, gso: bool) -> usize {
    let dst = bed.tun_addr(to);
    let rx = in_ns(&bed.ns(to), || UdpSocket::bind("0.0.0.0:6000").unwrap());
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let _ = flannel::datapath::batch::set_int_opt(
        rx.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        8 << 20,
    );
    let arrived = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (arrived, done) = (arrived.clone(), done.clone());
        std::thread::spawn(move || {
            let mut seen = vec![false; n];
            let mut buf = [0u8; 65536];
            loop {
                let len = match rx.recv(&mut buf) {
                    Ok(len) => len,
                    Err(_) if done.load(Ordering::Relaxed) => break,
                    Err(_) => continue,
                };
                assert_eq!(len, size, "datagram size changed in the tunnel");
                let seq = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                assert!(seq < n);
                assert!(
                    buf[4..len]
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == (seq + i) as u8),
                    "datagram {seq} corrupted"
                );
                if !seen[seq] {
                    seen[seq] = true;
                    arrived.fetch_add(1, Ordering::Relaxed);
                }
            }
            seen.iter().filter(|&&s| s).count()
        })
    };
    let window_arrived = arrived.clone();
    in_ns(&bed.ns(from), move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect((dst, 6000)).unwrap();
        let per = if gso { 16 } else { 1 };
        if gso {
            flannel::datapath::batch::set_int_opt(s.as_raw_fd(), libc::SOL_UDP, 103, size as i32)
                .unwrap();
        }
        let mut buf = vec![0u8; size * per];
        let mut seq = 0;
        while seq < n {
            let k = per.min(n - seq);
            for j in 0..k {
                let d = &mut buf[j * size..(j + 1) * size];
                d[..4].copy_from_slice(&((seq + j) as u32).to_be_bytes());
                for (i, b) in d[4..].iter_mut().enumerate() {
                    *b = (seq + j + i) as u8;
                }
            }
            let _ = s.send(&buf[..k * size]);
            seq += k;
            let t = std::time::Instant::now();
            while seq - window_arrived.load(Ordering::Relaxed).min(seq) > WINDOW
                && t.elapsed() < Duration::from_secs(2)
            {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    });
    // Everything sent has arrived, or the last window's wait timed out.
    wait_for_or("the flood's last datagrams", Duration::from_secs(2), || {
        (arrived.load(Ordering::Relaxed) == n).then_some(())
    });
    done.store(true, Ordering::Relaxed);
    receiver.join().unwrap()
}

/// Polls `f` until it returns Some or `timeout` passes; no panic.
fn wait_for_or(_what: &str, timeout: Duration, mut f: impl FnMut() -> Option<()>) {
    let t = std::time::Instant::now();
    while f().is_none() && t.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The metrics port the tests here give the daemons (one per namespace).
const PORT: u16 = 9113;

/// The offloads a daemon negotiated, from its `/metrics`.
fn offloads(bed: &Bed, i: usize) -> [u64; 4] {
    let m = http_get(&bed.ns(i), PORT, "/metrics").expect("metrics").1;
    ["tun_tso", "tun_uso", "udp_gso", "udp_gro"]
        .map(|f| metric(&m, &format!(r#"flannel_offload{{feature="{f}"}}"#)))
}

#[test]
fn tcp_and_udp_arrive_intact_with_offloads_on_and_off() {
    let _heavy = heavy();
    let port = format!("--healthz-port={PORT}");
    for mode in MODES {
        let mut bed = two_hosts(&[mode, &port]);
        // The modes are what they say: with auto, this kernel (6.x) gives
        // TUN TSO and USO and UDP GSO and GRO; off gives none. Without this
        // a silent fallback would turn the offload tests into plain ones.
        let want = if mode == "--offload=auto" {
            [1; 4]
        } else {
            [0; 4]
        };
        for i in 0..2 {
            assert_eq!(
                offloads(&bed, i),
                want,
                "{mode}: h{i}'s [tun_tso, tun_uso, udp_gso, udp_gro]"
            );
        }
        for (a, b) in [(0, 1), (1, 0)] {
            let data = pattern(16 << 20, 7 + a as u64);
            let got = tcp_transfer(&bed, a, b, data.clone());
            assert!(
                got == data,
                "{mode}: 16 MB TCP h{a} -> h{b} corrupted or short ({} bytes)",
                got.len()
            );
        }
        for gso in [false, true] {
            let n = 4000;
            let got = udp_flood(&bed, 0, 1, n, 1200, gso);
            assert_eq!(
                got, n,
                "{mode} gso={gso}: datagrams lost in a windowed flood"
            );
        }
        for i in 0..2 {
            assert!(bed.stop(i, libc::SIGTERM).unwrap().success());
            let log = bed.log(i);
            let c = log
                .lines()
                .find(|l| l.contains("data path counters"))
                .unwrap();
            assert!(
                c.contains("malformed=0") && c.contains("send_error=0"),
                "{mode}: {c}"
            );
        }
    }
}

#[test]
fn peers_with_offloads_on_and_off_interoperate() {
    let _heavy = heavy();
    let mut bed = Bed::new(2);
    let port = format!("--healthz-port={PORT}");
    bed.start_ready_with(0, &["--offload=auto", &port]);
    bed.start_ready_with(1, &["--offload=off", "--workers=1", &port]);
    assert_eq!(offloads(&bed, 0), [1; 4]);
    assert_eq!(offloads(&bed, 1), [0; 4]);
    let dst = bed.tun_addr(1);
    wait_for("h0 -> h1", Duration::from_secs(10), || {
        bed.ping(0, dst).then_some(())
    });
    for (a, b) in [(0, 1), (1, 0)] {
        let data = pattern(12 << 20, 3 + a as u64);
        assert!(
            tcp_transfer(&bed, a, b, data.clone()) == data,
            "h{a} -> h{b}"
        );
    }
}

/// Checks one underlay datagram the way a Go flanneld (plain recvfrom) would
/// need it: one IPv4 packet, ≤ MTU, valid IP and TCP/UDP checksums.
fn check_wire_packet(p: &[u8], mtu: usize) -> Result<(), String> {
    let v = Ipv4Packet::new_checked(p).map_err(|e| format!("not one IPv4 packet: {e}"))?;
    if p.len() > mtu {
        return Err(format!("{} bytes > MTU {mtu}", p.len()));
    }
    if !v.header_checksum_ok() {
        return Err("bad IPv4 header checksum".into());
    }
    let t = v.payload();
    let proto = v.protocol();
    if proto == 6 || (proto == 17 && t.len() >= 8 && t[6..8] != [0, 0]) {
        let s = sum(
            t,
            pseudo_header_sum(&p[12..16], &p[16..20], proto, t.len() as u16),
        );
        if fold(s) != 0xffff {
            return Err(format!("bad transport checksum (proto {proto})"));
        }
    }
    Ok(())
}

/// h1 announces a relay's address as its PublicIP: h0 (offloads on) sends
/// to a plain UDP socket, which checks every datagram and forwards it to h1.
#[test]
fn a_plain_udp_peer_sees_only_ordinary_checksummed_packets_within_mtu() {
    let _heavy = heavy();
    let mut bed = Bed::new(3);
    // Datagrams arrive from the relay, not from the PublicIP they claim:
    // exactly the NAT case the escape hatch is for.
    let port = format!("--healthz-port={PORT}");
    bed.start_ready_with(0, &["--offload=auto", "--accept-unknown-peers", &port]);
    assert_eq!(
        offloads(&bed, 0),
        [1; 4],
        "h0 must send GSO super-packets here"
    );
    let relay_ip = bed.hosts[2].ip;
    bed.start_ready_with(
        1,
        &[
            "--offload=auto",
            "--accept-unknown-peers",
            &format!("--public-ip={relay_ip}"),
        ],
    );
    let h1_ip = bed.hosts[1].ip;
    let relay = in_ns(&bed.ns(2), || UdpSocket::bind("0.0.0.0:8285").unwrap());
    relay
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (checked, bad) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::new())),
    );
    let worker = {
        let (stop, checked, bad) = (stop.clone(), checked.clone(), bad.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = relay.recv_from(&mut buf) else {
                    continue;
                };
                if let Err(e) = check_wire_packet(&buf[..n], 1472) {
                    bad.lock().unwrap().push(format!("from {from}: {e}"));
                }
                checked.fetch_add(1, Ordering::Relaxed);
                relay.send_to(&buf[..n], (h1_ip, 8285)).unwrap();
            }
        })
    };
    let dst = bed.tun_addr(1);
    wait_for(
        "h0 -> h1 through the relay",
        Duration::from_secs(10),
        || bed.ping(0, dst).then_some(()),
    );
    let data = pattern(16 << 20, 11);
    let got = tcp_transfer(&bed, 0, 1, data.clone());
    let got_udp = udp_flood(&bed, 0, 1, 2000, 1300, true);
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    let bad = bad.lock().unwrap();
    assert!(
        bad.is_empty(),
        "{} bad datagrams, first: {:?}",
        bad.len(),
        bad.first()
    );
    assert!(
        checked.load(Ordering::Relaxed) > 10_000,
        "too few datagrams checked"
    );
    assert!(got == data, "16 MB through the relay corrupted");
    assert_eq!(got_udp, 2000, "UDP GSO flood through the relay");
}

/// TCP, UDP and ICMP at once, so batches carry mixed flows.
#[test]
fn mixed_tcp_udp_and_icmp_flows_share_batches() {
    let _heavy = heavy();
    let mut bed = Bed::new(2);
    bed.start_ready(0);
    bed.start_ready(1);
    let dst = bed.tun_addr(1);
    wait_for("h0 -> h1", Duration::from_secs(10), || {
        bed.ping(0, dst).then_some(())
    });
    let drops_before = kernel_tun_drops(&bed);
    let ns0 = bed.ns(0);
    let pinger = std::thread::spawn(move || {
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns0,
                "ping",
                "-q",
                "-c",
                "300",
                "-i",
                "0.005",
                "-s",
                "1000",
                &dst.to_string(),
            ])
            .output()
            .unwrap()
    });
    let data = pattern(16 << 20, 5);
    let got = std::thread::scope(|s| {
        let t = s.spawn(|| tcp_transfer(&bed, 0, 1, data.clone()));
        let u = udp_flood(&bed, 1, 0, 3000, 700, false);
        (t.join().unwrap(), u)
    });
    let (got, udp_got) = got;
    assert!(got == data, "TCP beside UDP and ICMP corrupted");
    let out = pinger.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let received: u64 = text
        .split(", ")
        .find_map(|p| p.strip_suffix(" received")?.trim().parse().ok())
        .unwrap_or(0);
    // Beside a bulk TCP stream the kernel may drop a packet at a full TUN
    // queue before we ever see it; every loss must be one the kernel
    // counted there, none may be ours.
    let kernel = kernel_tun_drops(&bed) - drops_before;
    let lost = (300 - received) + (3000 - udp_got as u64);
    println!("pings answered {received}/300, UDP {udp_got}/3000, kernel TUN drops {kernel}");
    assert!(received > 0, "no ping answered: {text}");
    assert!(
        lost <= kernel,
        "{lost} lost (pings {received}/300, UDP {udp_got}/3000) but the kernel dropped only {kernel} at the TUNs: {text}"
    );
}

/// Packets the kernel dropped at both hosts' TUN devices (device rx/tx
/// drops and qdisc drops): losses that happen before our daemon sees a packet.
fn kernel_tun_drops(bed: &Bed) -> u64 {
    let mut total = 0;
    for i in 0..bed.hosts.len() {
        let ns = bed.ns(i);
        let link: serde_json::Value = serde_json::from_str(&sh(&[
            "ip", "-n", &ns, "-s", "-j", "link", "show", "flannel0",
        ]))
        .unwrap();
        let st = &link[0]["stats64"];
        total += st["rx"]["dropped"].as_u64().unwrap() + st["tx"]["dropped"].as_u64().unwrap();
        let q: serde_json::Value = serde_json::from_str(&sh(&[
            "tc", "-n", &ns, "-s", "-j", "qdisc", "show", "dev", "flannel0",
        ]))
        .unwrap();
        total += q
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["drops"].as_u64().unwrap_or(0))
            .sum::<u64>();
    }
    total
}
