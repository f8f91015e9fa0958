//! `--ip-masq`: pods reach an outside host masqueraded to their node's
//! address; pod-to-pod traffic across hosts keeps its source; a flushed nat
//! table is healed within a resync; rules go on clean shutdown.

mod support;

use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use support::*;

const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

/// Connects from `from_ns` to `dst` and returns the peer address the server
/// in `to_ns` saw.
fn seen_source(from_ns: &str, to_ns: &str, dst: Ipv4Addr) -> Ipv4Addr {
    let (tx, rx) = std::sync::mpsc::channel();
    let server = spawn_in_ns(to_ns, move || {
        let l = TcpListener::bind("0.0.0.0:0").unwrap();
        tx.send(l.local_addr().unwrap().port()).unwrap();
        let (_, peer) = l.accept().unwrap();
        peer
    });
    let port = rx.recv().unwrap();
    in_ns(from_ns, move || {
        TcpStream::connect_timeout(&SocketAddrV4::new(dst, port).into(), Duration::from_secs(5))
            .expect("connect");
    });
    match server.join().unwrap() {
        SocketAddr::V4(a) => *a.ip(),
        other => panic!("{other}"),
    }
}

/// An IPv4/UDP packet from `src` to `dst:port` (UDP checksum 0).
fn forged_udp(src: [u8; 4], dst: [u8; 4], port: u16, payload: &[u8]) -> Vec<u8> {
    let len = 28 + payload.len();
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let mut sum: u32 = p[..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&4444u16.to_be_bytes());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

fn nat_rules(ns: &str) -> String {
    sh(&["ip", "netns", "exec", ns, "iptables-save", "-t", "nat"])
}

#[test]
fn ip_masq_masquerades_outbound_only_and_heals() {
    run(false);
}

#[test]
fn ip_masq_with_nftables_when_the_config_asks() {
    run(true);
}

/// Our rules as the backend lists them (empty if none).
fn listed(ns: &str, nft: bool) -> String {
    if nft {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "nft",
                "list",
                "table",
                "ip",
                "flannel-ipv4",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        nat_rules(ns)
            .lines()
            .filter(|l| l.contains("FLANNEL-POSTRTG"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn run(nft: bool) {
    let mut bed = Bed::new(2);
    if nft {
        bed.put(
            &format!("{PREFIX}/config"),
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"},"EnableNFTables":true}"#,
        );
    }
    // An "outside" host beyond the hub, which routes between the two.
    let out = bed.add_ns_named("out");
    sh(&[
        "ip", "-n", &bed.hub, "link", "add", "vout", "type", "veth", "peer", "name", "eth0",
        "netns", &out,
    ]);
    sh(&[
        "ip",
        "-n",
        &bed.hub,
        "addr",
        "add",
        "198.51.100.1/24",
        "dev",
        "vout",
    ]);
    sh(&["ip", "-n", &bed.hub, "link", "set", "vout", "up"]);
    sh(&[
        "ip",
        "-n",
        &out,
        "addr",
        "add",
        &format!("{OUTSIDE}/24"),
        "dev",
        "eth0",
    ]);
    sh(&["ip", "-n", &out, "link", "set", "eth0", "up"]);
    sh(&[
        "ip",
        "-n",
        &out,
        "route",
        "add",
        "default",
        "via",
        "198.51.100.1",
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &bed.hub,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    for i in 0..2 {
        bed.start_ready_with(i, &["--ip-masq", "--iptables-resync=1"]);
        let env = std::fs::read_to_string(&bed.hosts[i].subnet_file).unwrap();
        assert!(env.contains("FLANNEL_IPMASQ=true"), "{env}");
    }
    let rules = listed(&bed.ns(0), nft);
    if nft {
        assert!(
            rules.contains("masquerade fully-random") && rules.contains("flanneld forward"),
            "{rules}"
        );
    } else {
        assert!(
            rules.contains(
                r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#
            ),
            "{rules}"
        );
        let fwd = sh(&[
            "ip",
            "netns",
            "exec",
            &bed.ns(0),
            "iptables-save",
            "-t",
            "filter",
        ]);
        assert!(
            fwd.contains(
                r#"-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#
            ),
            "{fwd}"
        );
    }
    // One pod per host, through the CNI plugin (no masquerading of its own:
    // FLANNEL_IPMASQ=true makes the delegate's ipMasq false).
    let mut pods = Vec::new();
    for i in 0..2 {
        let pod = bed.add_ns_named(&format!("pod{i}"));
        let mut conf = net_conf(&bed, i);
        conf["delegate"] = json!({"isDefaultGateway": true});
        let (ok, res) = cni(&bed.ns(i), "flannel", "ADD", &format!("p{i}"), &pod, &conf);
        assert!(ok, "{res}");
        pods.push((pod, pod_ip(&res)));
    }
    // Outbound: masqueraded to the node's address.
    let src = seen_source(&pods[0].0, &out, OUTSIDE);
    assert_eq!(
        src, bed.hosts[0].ip,
        "pod traffic to the outside must leave as the node"
    );
    // Pod to pod across hosts: the pod's own address.
    let dst = pods[1].1;
    wait_for("pod0 -> pod1", Duration::from_secs(10), || {
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &pods[0].0,
                "ping",
                "-c1",
                "-W1",
                &dst.to_string(),
            ])
            .output()
            .unwrap()
            .status
            .success()
            .then_some(())
    });
    assert_eq!(
        seen_source(&pods[0].0, &pods[1].0, dst),
        pods[0].1,
        "pod-to-pod traffic must keep its source"
    );
    // A pod forging the tunnel: a UDP datagram to the other node's backend
    // port whose payload claims to come from its own node's subnet. Were it
    // masqueraded it would arrive from the node's PublicIP and be taken as
    // that node's traffic; it must not reach the pod behind the other node.
    let (tx, rx) = std::sync::mpsc::channel();
    let victim = spawn_in_ns(&pods[1].0, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:7777").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        tx.send(()).unwrap();
        let mut b = [0u8; 64];
        s.recv_from(&mut b).ok().map(|(n, _)| b[..n].to_vec())
    });
    rx.recv().unwrap();
    let forged_src = bed.tun_addr(0).octets();
    let forged = forged_udp(forged_src, pods[1].1.octets(), 7777, b"forged");
    let node1 = bed.hosts[1].ip;
    in_ns(&pods[0].0, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..5 {
            let _ = s.send_to(&forged, (node1, 8285));
        }
    });
    assert_eq!(
        victim.join().unwrap(),
        None,
        "a pod injected a packet through the tunnel"
    );
    if !nft {
        let nat = nat_rules(&bed.ns(0));
        assert!(
            nat.contains(r#"-A FLANNEL-POSTRTG -s 10.5.0.0/16 -p udp -m udp --dport 8285 -m comment --comment "flanneld masq" -j RETURN"#),
            "{nat}"
        );
    }
    // Someone flushes nat (or deletes our table): healed within a resync (1 s here).
    if nft {
        sh(&[
            "ip",
            "netns",
            "exec",
            &bed.ns(0),
            "nft",
            "delete",
            "table",
            "ip",
            "flannel-ipv4",
        ]);
    } else {
        sh(&[
            "ip",
            "netns",
            "exec",
            &bed.ns(0),
            "iptables",
            "-t",
            "nat",
            "-F",
        ]);
    }
    let t = Instant::now();
    wait_for("the rules to be restored", Duration::from_secs(5), || {
        listed(&bed.ns(0), nft)
            .contains(if nft {
                "masquerade"
            } else {
                "-j FLANNEL-POSTRTG"
            })
            .then_some(())
    });
    println!(
        "rules removed (nft: {nft}): restored {:?} later",
        t.elapsed()
    );
    assert_eq!(seen_source(&pods[0].0, &out, OUTSIDE), bed.hosts[0].ip);
    // Clean shutdown removes them.
    assert!(bed.stop(0, libc::SIGTERM).unwrap().success());
    let rules = listed(&bed.ns(0), nft);
    assert!(
        rules.trim().is_empty(),
        "rules left after shutdown:\n{rules}"
    );
    // Nothing of ours anywhere: the forward rules (filter table) and the
    // jumps into our chains go too, not only the nat chain.
    let everything = if nft {
        sh(&["ip", "netns", "exec", &bed.ns(0), "nft", "list", "ruleset"])
    } else {
        sh(&["ip", "netns", "exec", &bed.ns(0), "iptables-save"])
    };
    for ours in ["FLANNEL-FWD", "FLANNEL-POSTRTG", "flanneld", "flannel-ipv4"] {
        assert!(
            !everything.contains(ours),
            "{ours} left after shutdown:\n{everything}"
        );
    }
}

/// A PATH whose `iptables-restore`/`iptables-save` are the legacy ones, as
/// on a legacy-iptables host.
fn legacy_path(bed: &Bed) -> String {
    let bin = bed.dir.join("legacy-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (name, target) in [
        ("iptables-restore", "/usr/sbin/iptables-legacy-restore"),
        ("iptables-save", "/usr/sbin/iptables-legacy-save"),
    ] {
        let _ = std::os::unix::fs::symlink(target, bin.join(name));
    }
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The capabilities `dist/flanneld.service` grants, as `setpriv` arguments
/// (e.g. `-all,+net_admin,+net_raw`).
fn unit_caps() -> String {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dist/flanneld.service"
    ))
    .unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("AmbientCapabilities in the unit");
    let bound = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet in the unit");
    assert_eq!(line, bound, "ambient and bounding sets differ");
    let mut s = "-all".to_string();
    for c in line.split_whitespace() {
        s.push_str(&format!(
            ",+{}",
            c.trim_start_matches("CAP_").to_lowercase()
        ));
    }
    s
}

/// `--ip-masq` with exactly the unit's capabilities, on the nft-based
/// iptables and on legacy iptables (`iptables-legacy-restore` first in
/// PATH, as on a legacy host): the rules are applied either way.
#[test]
fn ip_masq_works_with_exactly_the_units_capabilities_on_nft_and_legacy() {
    let caps = unit_caps();
    for legacy in [false, true] {
        let bed = Bed::new(1);
        let h = &bed.hosts[0];
        let path = if legacy {
            legacy_path(&bed)
        } else {
            std::env::var("PATH").unwrap_or_default()
        };
        let log = bed.dir.join(format!("caps-{legacy}.log"));
        let (mut child, _) = spawn_until_lease(
            std::process::Command::new("ip")
                .args(["netns", "exec", &h.ns, "setpriv"])
                .arg(format!("--inh-caps={caps}"))
                .arg(format!("--ambient-caps={caps}"))
                .arg(format!("--bounding-set={caps}"))
                .arg("--")
                .arg(flanneld_bin())
                .arg(format!("--etcd-endpoints={}", bed.endpoint))
                .arg(format!("--subnet-file={}", h.subnet_file.display()))
                .args(["--ip-masq", "--iptables-resync=1"])
                // And flannel's --ip-masq-fully-random-disable, on one backend.
                .args(if legacy {
                    &["--ip-masq-fully-random-disable"][..]
                } else {
                    &[][..]
                })
                .env("PATH", &path),
            &log,
            &h.subnet_file.clone(),
            "a lease with the unit's capabilities",
        );
        let ns = bed.ns(0);
        let save = if legacy {
            "iptables-legacy-save"
        } else {
            "iptables-save"
        };
        wait_for(
            &format!("the rules (legacy: {legacy})"),
            Duration::from_secs(10),
            || {
                sh(&["ip", "netns", "exec", &ns, save, "-t", "nat"])
                    .contains("FLANNEL-POSTRTG")
                    .then_some(())
            },
        );
        let nat = sh(&["ip", "netns", "exec", &ns, save, "-t", "nat"]);
        assert_eq!(
            nat.matches("--random-fully").count(),
            if legacy { 0 } else { 2 },
            "{nat}"
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            !text.contains("applying iptables rules failed"),
            "legacy {legacy}: {text}"
        );
        assert!(term_child(&mut child));
        assert!(!sh(&["ip", "netns", "exec", &ns, save, "-t", "nat"]).contains("FLANNEL-POSTRTG"));
    }
}

/// kube-proxy or Docker holding the xtables lock while flanneld applies its
/// rules (legacy iptables, where the lock exists): the rules go in once the
/// lock is free, with no failed attempt. The lock is the host's
/// (/run/xtables.lock), held here for 2 s.
#[test]
fn a_busy_xtables_lock_delays_the_rules_instead_of_failing_them() {
    let bed = Bed::new(1);
    let h = &bed.hosts[0];
    let path = legacy_path(&bed);
    let mut holder = std::process::Command::new("flock")
        .args(["/run/xtables.lock", "sleep", "2"])
        .spawn()
        .unwrap();
    wait_for("the lock to be held", Duration::from_secs(5), || {
        let free = std::process::Command::new("flock")
            .args(["-n", "/run/xtables.lock", "true"])
            .status()
            .unwrap()
            .success();
        (!free).then_some(())
    });
    let log = bed.dir.join("lock.log");
    let t = Instant::now();
    let (mut child, _) = spawn_until_lease(
        std::process::Command::new("ip")
            .args(["netns", "exec", &h.ns])
            .arg(flanneld_bin())
            .arg(format!("--etcd-endpoints={}", bed.endpoint))
            .arg(format!("--subnet-file={}", h.subnet_file.display()))
            .args(["--ip-masq", "--iptables-forward-rules=false"])
            .env("PATH", &path),
        &log,
        &h.subnet_file.clone(),
        "a lease while the lock is busy",
    );
    let ns = bed.ns(0);
    wait_for("the rules after the lock", Duration::from_secs(15), || {
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "iptables-legacy-save",
            "-t",
            "nat",
        ])
        .contains("FLANNEL-POSTRTG")
        .then_some(())
    });
    println!(
        "rules applied {:?} after start, the lock held for 2 s",
        t.elapsed()
    );
    let _ = holder.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("applying iptables rules failed"), "{text}");
    assert!(term_child(&mut child));
}

/// An iptables that hangs (a wedged kernel lock, a stuck NFS-mounted
/// binary): the rules check is given 10 s, then the control loop goes on —
/// the lease is renewed and peers are followed while the call hangs — and
/// no second check is stacked on the hung one. The hang is the real
/// `iptables-legacy-save` held back by a wrapper while a marker file exists.
#[test]
fn a_hung_iptables_never_stalls_the_control_loop() {
    const PORT: u16 = 9131;
    let mut bed = Bed::new(2);
    bed.start_ready(1);
    let bin = bed.dir.join("hang-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let marker = bed.dir.join("hang");
    let save = bin.join("iptables-save");
    std::fs::write(
        &save,
        format!(
            "#!/bin/sh\nwhile [ -e {} ]; do sleep 0.1; done\nexec /usr/sbin/iptables-legacy-save \"$@\"\n",
            marker.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&save, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _ = std::os::unix::fs::symlink(
        "/usr/sbin/iptables-legacy-restore",
        bin.join("iptables-restore"),
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let h = &bed.hosts[0];
    let log = bed.dir.join("hang.log");
    let _ = std::fs::remove_file(&h.subnet_file);
    let (mut child, sn) = spawn_until_lease(
        std::process::Command::new("ip")
            .args(["netns", "exec", &h.ns])
            .arg(flanneld_bin())
            .arg(format!("--etcd-endpoints={}", bed.endpoint))
            .arg(format!("--subnet-file={}", h.subnet_file.display()))
            .args([
                "--ip-masq",
                "--iptables-forward-rules=false",
                "--iptables-resync=1",
                "--subnet-lease-ttl=6",
                &format!("--healthz-port={PORT}"),
            ])
            .env("PATH", &path),
        &log,
        &h.subnet_file.clone(),
        "a lease",
    );
    let ns0 = bed.ns(0);
    let renewals = || {
        metric(
            &http_get(&ns0, PORT, "/metrics").expect("metrics").1,
            "flannel_lease_renewals_total",
        )
    };
    wait_for("the rules", Duration::from_secs(10), || {
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns0,
            "iptables-legacy-save",
            "-t",
            "nat",
        ])
        .contains("FLANNEL-POSTRTG")
        .then_some(())
    });
    std::fs::write(&marker, b"").unwrap();
    let hung = || {
        std::process::Command::new("pgrep")
            .args(["-f", &save.display().to_string()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0)
    };
    wait_for("a check to hang", Duration::from_secs(5), || {
        (hung() >= 1).then_some(())
    });
    let before = renewals();
    let t = Instant::now();
    // While it hangs (longer than two TTLs): renewals go on, a peer's
    // deleted lease is followed, one hung call only.
    let sn1 = flannel::subnet_env::read_previous_subnet(&bed.hosts[1].subnet_file).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    bed.stop(1, libc::SIGTERM);
    bed.del(&key_of(sn1));
    let mut most = 0;
    while t.elapsed() < Duration::from_secs(14) {
        most = most.max(hung());
        std::thread::sleep(Duration::from_millis(200));
    }
    let during = renewals() - before;
    let text = std::fs::read_to_string(&log).unwrap();
    println!("iptables hung 14 s: {during} renewals meanwhile, at most {most} hung checks at once");
    assert!(during >= 3, "{during} renewals\n{text}");
    assert_eq!(most, 1, "{text}");
    assert!(text.contains("did not finish within 10 s"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("peer removed") && l.contains(&sn1.to_string())),
        "{text}"
    );
    assert!(
        bed.lease_id(&key_of(sn)).is_some(),
        "our lease expired\n{text}"
    );
    // The hang ends: checks resume and the daemon is still well.
    std::fs::remove_file(&marker).unwrap();
    wait_for("the checks to resume", Duration::from_secs(10), || {
        (hung() == 0).then_some(())
    });
    assert!(child.try_wait().unwrap().is_none(), "{text}");
    assert!(term_child(&mut child));
}
