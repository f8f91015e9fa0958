//! End-to-end: real etcd, namespaced hosts, our flanneld on each.
//! Needs root, /dev/net/tun, etcd-server/etcd-client and iputils-ping.

mod support;

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;
use support::*;

#[test]
fn three_hosts_get_distinct_subnets_and_reach_each_other() {
    let mut bed = Bed::new(3);
    let subnets: Vec<_> = (0..3).map(|i| bed.start_ready(i)).collect();
    for (i, a) in subnets.iter().enumerate() {
        for b in &subnets[i + 1..] {
            assert_ne!(a, b, "two hosts hold the same subnet");
        }
        assert_eq!(a.prefix(), 24);
    }
    // etcd holds exactly the Go udp backend's lease values.
    let leases = bed.leases();
    assert_eq!(leases.len(), 3, "{leases:?}");
    for (i, sn) in subnets.iter().enumerate() {
        let key = format!("{PREFIX}/subnets/{}-24", sn.network());
        let v = &leases
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("no {key}"))
            .1;
        assert_eq!(
            v,
            &format!(r#"{{"PublicIP":"{}","PublicIPv6":null}}"#, bed.hosts[i].ip)
        );
        // subnet.env as flannel writes it; MTU = 1500 - 28.
        let env = std::fs::read_to_string(&bed.hosts[i].subnet_file).unwrap();
        let first = Ipv4Addr::from(u32::from(sn.network()) + 1);
        assert_eq!(
            env,
            format!("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET={first}/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")
        );
        // TUN: flannel0, /32 of the subnet, MTU 1472, route for the Network.
        let link = sh(&[
            "ip",
            "-n",
            &bed.ns(i),
            "-o",
            "addr",
            "show",
            "dev",
            "flannel0",
        ]);
        assert!(
            link.contains(&format!("inet {}/32", sn.network())),
            "{link}"
        );
        let mtu = sh(&["ip", "-n", &bed.ns(i), "link", "show", "flannel0"]);
        assert!(mtu.contains("mtu 1472"), "{mtu}");
    }
    for a in 0..3 {
        for b in 0..3 {
            if a != b {
                let dst = bed.tun_addr(b);
                wait_for(
                    &format!("ping h{a} -> h{b} ({dst})"),
                    Duration::from_secs(10),
                    || bed.ping(a, dst).then_some(()),
                );
                let data = pattern(8 << 20, (a * 3 + b) as u64 + 1);
                let got = tcp_transfer(&bed, a, b, data.clone());
                assert_eq!(got.len(), data.len(), "h{a} -> h{b}: length");
                assert!(got == data, "h{a} -> h{b}: 8 MB arrived corrupted");
            }
        }
    }
}

#[test]
fn a_late_host_becomes_reachable_without_restarts() {
    let mut bed = Bed::new(3);
    for i in 0..3 {
        bed.start_ready(i);
    }
    let late = bed.add_host();
    bed.start_ready(late);
    let dst = bed.tun_addr(late);
    for i in 0..3 {
        wait_for(
            &format!("h{i} to reach the late host"),
            Duration::from_secs(10),
            || bed.ping(i, dst).then_some(()),
        );
        assert!(bed.ping(late, bed.tun_addr(i)));
    }
    for i in 0..3 {
        assert!(bed.is_running(i), "h{i} must not have restarted");
    }
}

#[test]
fn a_deleted_lease_makes_its_host_net_unreachable() {
    let mut bed = Bed::new(2);
    bed.start_ready(0);
    let sn1 = bed.start_ready(1);
    let dst = bed.tun_addr(1);
    wait_for("h0 -> h1", Duration::from_secs(10), || {
        bed.ping(0, dst).then_some(())
    });
    // Never leased: ICMP net unreachable comes back at once (flannel's own
    // reply is dropped as a martian; ours must arrive).
    assert_eq!(
        udp_probe_error(&bed, 0, Ipv4Addr::new(10, 5, 250, 1)),
        Some(libc::ENETUNREACH),
        "no ICMP net unreachable for an unleased destination"
    );
    // TTL 1 expires in the tunnel: ICMP time exceeded (flannel drops silently).
    assert_eq!(
        udp_probe_error_ttl(&bed, 0, dst, 1),
        Some(libc::EHOSTUNREACH)
    );
    // Stop h1's daemon so it cannot re-create its lease, then delete it.
    bed.stop(1, libc::SIGTERM);
    bed.del(&format!("{PREFIX}/subnets/{}-24", sn1.network()));
    wait_for(
        "h1 to become net unreachable",
        Duration::from_secs(5),
        || (udp_probe_error(&bed, 0, dst) == Some(libc::ENETUNREACH)).then_some(()),
    );
    assert!(!bed.ping(0, dst));
}

#[test]
fn a_restarted_daemon_keeps_its_subnet() {
    let mut bed = Bed::new(2);
    let first = bed.start_ready(0);
    bed.start_ready(1);
    // Clean stop: the lease stays in etcd, the TUN goes away.
    assert!(bed.stop(0, libc::SIGTERM).unwrap().success());
    assert_eq!(bed.leases().len(), 2, "the lease must stay after SIGTERM");
    let links = sh(&["ip", "-n", &bed.ns(0), "link"]);
    assert!(!links.contains("flannel0"), "TUN left behind: {links}");
    assert_eq!(bed.start_ready(0), first);
    // SIGKILL, and without the subnet file: etcd's lease with our PublicIP wins.
    bed.stop(0, libc::SIGKILL);
    std::fs::remove_file(&bed.hosts[0].subnet_file).unwrap();
    assert_eq!(bed.start_ready(0), first);
    assert_eq!(bed.leases().len(), 2, "no duplicate lease");
    let dst = bed.tun_addr(0);
    wait_for("h1 -> restarted h0", Duration::from_secs(10), || {
        bed.ping(1, dst).then_some(())
    });
}

/// A raw UDP socket on port 8285 plays a Go flanneld peer that uses plain
/// recvfrom()/sendto(): what arrives must be exactly the inner IPv4 packet,
/// and a bare IPv4 packet it sends must be delivered.
#[test]
fn underlay_datagrams_carry_exactly_the_inner_packet_on_port_8285() {
    let mut bed = Bed::new(2);
    // Go flanneld's exact wire, source port included (the default sends
    // from one port per worker; see tests/path.rs for that case).
    let sn0 = bed.start_ready_with(0, &["--udp-source-ports=fixed"]);
    let peer = 1;
    let peer_ip = bed.hosts[peer].ip;
    // The fake peer's lease, as a Go flanneld would write it.
    bed.put(
        &format!("{PREFIX}/subnets/10.5.200.0-24"),
        &format!(r#"{{"PublicIP":"{peer_ip}","PublicIPv6":null}}"#),
    );
    let sock = in_ns(&bed.ns(peer), || UdpSocket::bind("0.0.0.0:8285").unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<u16>();
    let sender = spawn_in_ns(&bed.ns(0), move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        tx.send(s.local_addr().unwrap().port()).unwrap();
        for _ in 0..50 {
            let _ = s.send_to(b"hello flannel", "10.5.200.7:9999");
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let src_port = rx.recv().unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = wait_for(
        "a datagram at the fake peer",
        Duration::from_secs(10),
        || sock.recv_from(&mut buf).ok(),
    );
    let pkt = &buf[..n];
    assert_eq!(
        from,
        std::net::SocketAddr::from((bed.hosts[0].ip, 8285)),
        "must come from port 8285 of h0's address"
    );
    assert_eq!(
        n,
        20 + 8 + 13,
        "payload is the inner packet and nothing else"
    );
    assert_eq!(pkt[0], 0x45);
    assert_eq!(u16::from_be_bytes([pkt[2], pkt[3]]) as usize, n);
    assert_eq!(pkt[9], 17);
    assert_eq!(
        &pkt[12..16],
        &sn0.network().octets(),
        "inner source: h0's TUN address"
    );
    assert_eq!(&pkt[16..20], &[10, 5, 200, 7]);
    assert_eq!(pkt[8], 63, "TTL decremented once on the way out");
    assert_eq!(
        flannel::wire::checksum(&pkt[..20]),
        0,
        "valid header checksum"
    );
    assert_eq!(u16::from_be_bytes([pkt[20], pkt[21]]), src_port);
    assert_eq!(u16::from_be_bytes([pkt[22], pkt[23]]), 9999);
    assert_eq!(&pkt[28..], b"hello flannel");
    sender.join().unwrap();

    // Reverse: the fake peer sends a bare IPv4/UDP packet from 10.5.200.7.
    let listener = in_ns(&bed.ns(0), || UdpSocket::bind("0.0.0.0:7777").unwrap());
    listener
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut p = pkt.to_vec();
    p[12..16].copy_from_slice(&[10, 5, 200, 7]);
    p[16..20].copy_from_slice(&sn0.network().octets());
    p[8] = 64;
    p[10..12].copy_from_slice(&[0, 0]);
    let ck = flannel::wire::checksum(&p[..20]);
    p[10..12].copy_from_slice(&ck.to_be_bytes());
    p[20..22].copy_from_slice(&4444u16.to_be_bytes());
    p[22..24].copy_from_slice(&7777u16.to_be_bytes());
    p[26..28].copy_from_slice(&[0, 0]); // UDP checksum 0: none
    sock.send_to(&p, (bed.hosts[0].ip, 8285)).unwrap();
    let mut got = [0u8; 64];
    let (n, from) = listener
        .recv_from(&mut got)
        .expect("packet from the Go-style peer delivered");
    assert_eq!(&got[..n], b"hello flannel");
    assert_eq!(
        from,
        std::net::SocketAddr::from((Ipv4Addr::new(10, 5, 200, 7), 4444))
    );
}

#[test]
fn malformed_leases_and_garbage_datagrams_are_survived() {
    let mut bed = Bed::new(2);
    bed.start_ready(0);
    // Another writer's garbage: bad JSON and a bad key.
    bed.put(&format!("{PREFIX}/subnets/10.5.201.0-24"), "{not json");
    bed.put(
        &format!("{PREFIX}/subnets/garbage"),
        r#"{"PublicIP":"1.2.3.4"}"#,
    );
    bed.start_ready(1);
    let dst = bed.tun_addr(1);
    wait_for(
        "h0 -> h1 despite bad leases",
        Duration::from_secs(10),
        || bed.ping(0, dst).then_some(()),
    );
    let log = bed.log(0);
    assert!(
        log.contains("10.5.201.0-24") && log.contains("malformed"),
        "no warning for the bad lease:\n{log}"
    );

    // Garbage at the UDP port: short, not IPv4, lying length, bad checksum.
    let target = (bed.hosts[0].ip, 8285);
    in_ns(&bed.ns(1), move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let good = {
            let mut p = vec![0u8; 28];
            p[0] = 0x45;
            p[2..4].copy_from_slice(&28u16.to_be_bytes());
            p[8] = 64;
            p[9] = 17;
            p
        };
        let mut liar = good.clone();
        liar[3] = 200;
        let mut v6 = good.clone();
        v6[0] = 0x60;
        for d in [
            &b""[..],
            b"x",
            &[0x45; 19],
            &liar,
            &v6,
            &good, /* checksum 0: wrong */
        ] {
            for _ in 0..10 {
                s.send_to(d, target).unwrap();
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        bed.is_running(0),
        "flanneld died on garbage:\n{}",
        bed.log(0)
    );
    assert!(bed.ping(1, bed.tun_addr(0)), "tunnel broken after garbage");
    assert!(bed.stop(0, libc::SIGTERM).unwrap().success());
    let log = bed.log(0);
    let counters = log
        .lines()
        .find(|l| l.contains("data path counters"))
        .expect("counters logged at exit");
    // 10 short + 10 + 10 + 10 liar + 10 bad checksum = 50 malformed (v6: not_ipv4).
    assert!(counters.contains("malformed=50"), "{counters}");
}

#[test]
fn bad_config_exits_nonzero_naming_the_problem() {
    let mut bed = Bed::empty();
    bed.add_host();
    let run = |bed: &Bed| {
        let out = bed.flanneld_cmd(0, &[]).output().unwrap();
        assert!(!out.status.success(), "flanneld must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    bed.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#,
    );
    let err = run(&bed);
    assert!(
        err.contains("Backend.Type") && err.contains("host-gw"),
        "{err}"
    );
    // A vxlan key this flanneld does not implement is refused by name.
    bed.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","GBP":true}}"#,
    );
    let err = run(&bed);
    assert!(err.contains("Backend.GBP"), "{err}");
    bed.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.5.0.0/16","SubnetLen":12}"#,
    );
    let err = run(&bed);
    assert!(err.contains("SubnetLen"), "{err}");
    bed.put(&format!("{PREFIX}/config"), "not json");
    let err = run(&bed);
    assert!(err.contains("not valid JSON"), "{err}");
    // Nothing was left behind by the failed starts.
    assert!(bed.leases().is_empty());
    assert!(!sh(&["ip", "-n", &bed.ns(0), "link"]).contains("flannel"));
}

#[test]
fn watch_survives_an_etcd_restart_and_routes_new_leases() {
    let mut bed = Bed::new(3);
    bed.start_ready(0);
    bed.start_ready(1);
    let dst1 = bed.tun_addr(1);
    wait_for("h0 -> h1", Duration::from_secs(10), || {
        bed.ping(0, dst1).then_some(())
    });
    bed.stop_etcd();
    // Known peers keep talking while etcd is away.
    assert!(bed.ping(0, dst1), "traffic stopped while etcd was down");
    bed.start_etcd();
    let sn2 = bed.start_ready(2);
    wait_for(
        "h0 to route to the host added after the etcd restart",
        Duration::from_secs(15),
        || bed.ping(0, sn2.network()).then_some(()),
    );
}

#[test]
fn leases_are_renewed_and_an_expired_lease_is_unrouted() {
    let mut bed = Bed::new(2);
    bed.start_ready(0);
    // A 4 s TTL (hidden test flag): renewed half-way, since the margin is longer.
    let _ = std::fs::remove_file(&bed.hosts[1].subnet_file);
    bed.start(1, &["--subnet-lease-ttl=4"]);
    let sn1 = bed.wait_subnet(1);
    let dst = bed.tun_addr(1);
    wait_for("h0 -> h1", Duration::from_secs(10), || {
        bed.ping(0, dst).then_some(())
    });
    // Three TTLs later the lease still exists: it was renewed.
    std::thread::sleep(Duration::from_secs(12));
    let key = format!("{PREFIX}/subnets/{}-24", sn1.network());
    assert!(
        bed.leases().iter().any(|(k, _)| *k == key),
        "lease not renewed"
    );
    assert!(bed.log(1).contains("lease renewed"));
    assert!(bed.ping(0, dst));
    // Killed: nobody renews, etcd expires the key, h0 unroutes it.
    bed.stop(1, libc::SIGKILL);
    wait_for("the lease to expire", Duration::from_secs(15), || {
        (!bed.leases().iter().any(|(k, _)| *k == key)).then_some(())
    });
    wait_for(
        "h0 to drop the expired route",
        Duration::from_secs(5),
        || (udp_probe_error(&bed, 0, dst) == Some(libc::ENETUNREACH)).then_some(()),
    );
    assert!(bed.log(0).contains("peer removed"), "{}", bed.log(0));
}

#[test]
fn traffic_follows_a_peer_whose_public_ip_changes() {
    let mut bed = Bed::new(3);
    bed.start_ready(0);
    let key = format!("{PREFIX}/subnets/10.5.200.0-24");
    let lease = |ip: Ipv4Addr| format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null}}"#);
    let socks: Vec<UdpSocket> = (1..3)
        .map(|i| {
            let s = in_ns(&bed.ns(i), || UdpSocket::bind("0.0.0.0:8285").unwrap());
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s
        })
        .collect();
    let send = |bed: &Bed| {
        in_ns(&bed.ns(0), || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(b"where are you", "10.5.200.9:9").unwrap();
        })
    };
    let mut buf = [0u8; 256];
    for (owner, other) in [(0usize, 1usize), (1, 0)] {
        bed.put(&key, &lease(bed.hosts[owner + 1].ip));
        wait_for(
            &format!("datagrams at h{}", owner + 1),
            Duration::from_secs(5),
            || {
                send(&bed);
                socks[owner].recv(&mut buf).ok()
            },
        );
        // Drain, then check the old owner gets nothing more.
        while socks[other].recv(&mut buf).is_ok() {}
        send(&bed);
        assert!(socks[owner].recv(&mut buf).is_ok());
        assert!(
            socks[other].recv(&mut buf).is_err(),
            "stale route to the old PublicIP"
        );
    }
    assert!(bed.log(0).contains("peer moved"));
}

/// Configured only through the FLANNELD_* variables dist/flanneld.default
/// sets, with a non-default etcd prefix and a non-default Backend.Port: the
/// leases live under that prefix, the tunnel runs on that port, the probe
/// listens where FLANNELD_HEALTHZ_* say.
#[test]
fn the_environment_file_a_prefix_and_a_backend_port_are_honoured() {
    let mut bed = Bed::empty();
    bed.put(
        "/my/overlay/config",
        r#"{"Network":"10.7.0.0/16","Backend":{"Type":"udp","Port":8999}}"#,
    );
    bed.add_host();
    bed.add_host();
    let mut children = Vec::new();
    let mut subnets = Vec::new();
    for i in 0..2 {
        let h = &bed.hosts[i];
        let log = bed.dir.join(format!("env-h{i}.log"));
        let (child, sn) = spawn_until_lease(
            std::process::Command::new("ip")
                .args(["netns", "exec", &h.ns])
                .arg(flanneld_bin())
                .env("FLANNELD_ETCD_ENDPOINTS", &bed.endpoint)
                .env("FLANNELD_ETCD_PREFIX", "/my/overlay")
                .env("FLANNELD_SUBNET_FILE", &h.subnet_file)
                .env("FLANNELD_IFACE", "eth0")
                .env("FLANNELD_PUBLIC_IP", h.ip.to_string())
                .env("FLANNELD_HEALTHZ_IP", "127.0.0.1")
                .env("FLANNELD_HEALTHZ_PORT", "9115"),
            &log,
            &h.subnet_file.clone(),
            &format!("h{i}'s lease"),
        );
        assert!(
            "10.7.0.0/16"
                .parse::<ipnetwork::Ipv4Network>()
                .unwrap()
                .contains(sn.network()),
            "{sn} is not in the prefix's Network"
        );
        subnets.push(sn);
        children.push(child);
    }
    // The leases are under the prefix, and only there.
    let under = String::from_utf8_lossy(
        &bed.etcdctl(&["get", "--prefix", "/my/overlay/subnets/", "--keys-only"])
            .stdout,
    )
    .into_owned();
    for sn in &subnets {
        assert!(
            under.contains(&format!("/my/overlay/subnets/{}-24", sn.network())),
            "{under}"
        );
    }
    assert!(
        bed.leases().is_empty(),
        "leases written under the default prefix"
    );
    // The tunnel works, on port 8999 and not on 8285.
    let dst = subnets[1].network();
    wait_for("h0 -> h1 over port 8999", Duration::from_secs(10), || {
        bed.ping(0, dst).then_some(())
    });
    let udp = sh(&["ip", "netns", "exec", &bed.ns(0), "ss", "-Huln"]);
    assert!(udp.contains(":8999 "), "{udp}");
    assert!(!udp.contains(":8285 "), "{udp}");
    // The probe listens on 127.0.0.1:9115.
    assert_eq!(
        http_get(&bed.ns(0), 9115, "/healthz").map(|r| r.0),
        Some(200)
    );
    for c in &mut children {
        assert!(term_child(c));
    }
}

/// flanneld started before the network config is written (the order
/// operators use): it waits, says so once, is alive but not ready, and
/// comes up when the config appears; SIGTERM while waiting exits cleanly.
#[test]
fn a_missing_config_is_waited_for() {
    const P: u16 = 9118;
    let mut bed = Bed::empty();
    bed.add_host();
    bed.add_host();
    bed.start(0, &[&format!("--healthz-port={P}")]);
    let ns0 = bed.ns(0);
    wait_for("the wait to be logged", Duration::from_secs(10), || {
        bed.log(0)
            .contains("no network config in etcd yet")
            .then_some(())
    });
    // Alive (/healthz 200) but not ready (/readyz 503); nothing leased.
    assert_eq!(http_get(&ns0, P, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(http_get(&ns0, P, "/readyz").map(|r| r.0), Some(503));
    assert!(bed.is_running(0));
    assert!(bed.leases().is_empty());
    // A second one, stopped while waiting: a clean exit, nothing left.
    bed.start(1, &[]);
    wait_for("h1 to wait", Duration::from_secs(10), || {
        bed.log(1)
            .contains("no network config in etcd yet")
            .then_some(())
    });
    assert!(bed.stop(1, libc::SIGTERM).unwrap().success());
    // The config appears: h0 leases, readies, and says it once.
    bed.put(&format!("{PREFIX}/config"), DEFAULT_CONFIG);
    bed.wait_subnet(0);
    wait_for("/readyz 200", Duration::from_secs(10), || {
        (http_get(&ns0, P, "/readyz")?.0 == 200).then_some(())
    });
    let log = bed.log(0);
    assert_eq!(
        log.matches("no network config in etcd yet").count(),
        1,
        "{log}"
    );
    assert!(log.contains("the network config appeared"), "{log}");
    assert_eq!(bed.leases().len(), 1);
}

/// An operator's Go flanneld options work unchanged: single-dash long
/// flags (`-flag=value` and `-flag value`), ParseBool spellings in flags and
/// FLANNELD_* variables, and an unknown FLANNELD_* variable is named in a
/// warning instead of being silently ignored.
#[test]
fn go_style_flags_and_booleans_are_accepted() {
    let bed = Bed::new(1);
    let h = &bed.hosts[0];
    let log = bed.dir.join("go-flags.log");
    let (mut child, sn) = spawn_until_lease(
        std::process::Command::new("ip")
            .args(["netns", "exec", &h.ns])
            .arg(flanneld_bin())
            .arg(format!("-etcd-endpoints={}", bed.endpoint))
            .args(["-subnet-file", &h.subnet_file.display().to_string()])
            .args(["-iface", "eth0", "-ip-masq=T"])
            .env("FLANNELD_IPTABLES_FORWARD_RULES", "0")
            .env("FLANNELD_NO_SUCH_SETTING", "1"),
        &log,
        &h.subnet_file.clone(),
        "a lease with Go-style flags",
    );
    let ns = bed.ns(0);
    // -ip-masq=T: flannel's nat rules; FLANNELD_IPTABLES_FORWARD_RULES=0: no FORWARD rules.
    wait_for("the masquerade rules", Duration::from_secs(10), || {
        sh(&["ip", "netns", "exec", &ns, "iptables-save", "-t", "nat"])
            .contains("FLANNEL-POSTRTG")
            .then_some(())
    });
    assert!(
        !sh(&["ip", "netns", "exec", &ns, "iptables-save", "-t", "filter"]).contains("FLANNEL-FWD")
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("FLANNELD_NO_SUCH_SETTING is set but is not a flanneld setting"),
        "{text}"
    );
    assert!(std::fs::read_to_string(&h.subnet_file)
        .unwrap()
        .contains("FLANNEL_IPMASQ=true"));
    println!("Go-style flags: lease {sn}");
    assert!(term_child(&mut child));
}

/// The external interface is picked as flannel picks it: `--public-ip`
/// alone by the interface that owns it, `--iface-regex` by address or name,
/// `--iface-can-reach` by the route to that address, never just the default
/// route's interface when one of them says otherwise.
#[test]
fn the_external_interface_follows_public_ip_regex_and_can_reach() {
    let mut bed = Bed::new(1);
    let ns = bed.ns(0);
    sh(&[
        "ip", "-n", &ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]);
    sh(&["ip", "-n", &ns, "addr", "add", "10.77.0.1/24", "dev", "d0"]);
    sh(&["ip", "-n", &ns, "link", "set", "d0", "up"]);
    sh(&["ip", "-n", &ns, "link", "set", "d1", "up"]);
    sh(&["ip", "-n", &ns, "route", "add", "10.78.0.0/16", "dev", "d0"]);
    for args in [
        vec!["--public-ip=10.77.0.1"],
        vec!["--iface-regex=^nomatch$,^d0$"],
        vec!["--iface-regex=^10\\.77\\."],
        vec!["--iface-can-reach=10.78.1.1"],
    ] {
        let sn = bed.start_ready_with(0, &args);
        let log = bed.log(0);
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("using external interface"))
            .unwrap_or("");
        assert!(line.contains("iface=d0"), "{args:?}: {line}");
        let udp = sh(&["ip", "netns", "exec", &ns, "ss", "-Huln"]);
        assert!(udp.contains("10.77.0.1:8285"), "{args:?}: {udp}");
        let lease = bed
            .leases()
            .into_iter()
            .find(|(k, _)| *k == key_of(sn))
            .unwrap();
        assert!(lease.1.contains("\"10.77.0.1\""), "{args:?}: {lease:?}");
        assert!(bed.stop(0, libc::SIGTERM).unwrap().success());
    }
    // A regex that matches nothing is a clear error.
    let out = bed
        .flanneld_cmd(0, &["--iface-regex=^zz"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--iface-regex"), "{err}");
}

#[test]
fn a_stale_network_route_through_another_device_is_replaced() {
    let mut bed = Bed::new(2);
    // Left behind by something else: the Network through another device.
    let ns0 = bed.ns(0);
    sh(&[
        "ip", "-n", &ns0, "link", "add", "stale0", "type", "veth", "peer", "name", "stale1",
    ]);
    sh(&["ip", "-n", &ns0, "link", "set", "stale0", "up"]);
    sh(&[
        "ip",
        "-n",
        &ns0,
        "route",
        "add",
        "10.5.0.0/16",
        "dev",
        "stale0",
    ]);
    bed.start_ready(0);
    bed.start_ready(1);
    let route = sh(&["ip", "-n", &ns0, "route", "show", "10.5.0.0/16"]);
    assert!(
        route.contains("dev flannel0") && !route.contains("stale0"),
        "{route}"
    );
    let dst = bed.tun_addr(1);
    wait_for("h0 -> h1", Duration::from_secs(10), || {
        bed.ping(0, dst).then_some(())
    });
}
