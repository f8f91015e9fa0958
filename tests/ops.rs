//! Operating the daemon: health, metrics, systemd readiness, version, JSON
//! logs, and running with the least privilege.

mod support;

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;
use support::*;

const PORT: u16 = 9102;

/// A well-formed IPv4/UDP packet from `src` to `dst` (valid header checksum).
fn inner_udp(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ck = flannel::wire::checksum(&p[..20]);
    p[10..12].copy_from_slice(&ck.to_be_bytes());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&9u16.to_be_bytes());
    p[24..26].copy_from_slice(&20u16.to_be_bytes());
    p
}

#[test]
fn health_and_metrics_follow_the_daemon_and_the_traffic() {
    let mut bed = Bed::new(2);
    bed.stop_etcd();
    // etcd away: the daemon waits; it is alive (/healthz 200, liveness as
    // flannel's) but not ready (/readyz 503).
    let _ = std::fs::remove_file(&bed.hosts[0].subnet_file);
    bed.start(0, &[&format!("--healthz-port={PORT}")]);
    let ns0 = bed.ns(0);
    let (code, _) = wait_for("/readyz to answer", Duration::from_secs(10), || {
        http_get(&ns0, PORT, "/readyz")
    });
    assert_eq!(code, 503, "not ready while etcd is away");
    assert_eq!(
        http_get(&ns0, PORT, "/healthz").map(|r| r.0),
        Some(200),
        "alive while waiting"
    );
    bed.start_etcd();
    bed.wait_subnet(0);
    bed.start_ready(1);
    wait_for("/readyz 200", Duration::from_secs(10), || {
        (http_get(&ns0, PORT, "/readyz")?.0 == 200).then_some(())
    });
    assert_eq!(http_get(&ns0, PORT, "/healthz").map(|r| r.0), Some(200));
    let dst = bed.tun_addr(1);
    wait_for("h0 -> h1", Duration::from_secs(10), || {
        bed.ping(0, dst).then_some(())
    });
    let before = http_get(&ns0, PORT, "/metrics").unwrap().1;
    // 50 pings: 50 more datagrams out and in; 7 garbage datagrams: 7
    // malformed; 5 spoofed: well-formed packets claiming h1's subnet as
    // inner source, sent from the hub's address, which owns no lease.
    let ns1 = bed.ns(1);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns1,
            "ping",
            "-c",
            "50",
            "-i",
            "0.01",
            "-q",
            &bed.tun_addr(0).to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let h0 = (bed.hosts[0].ip, 8285);
    in_ns(&ns1, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..7 {
            s.send_to(&[0x45; 30], h0).unwrap();
        }
    });
    let spoof = inner_udp(
        std::net::Ipv4Addr::from(u32::from(bed.tun_addr(1)) + 5),
        bed.tun_addr(0),
    );
    in_ns(&bed.hub.clone(), move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..5 {
            s.send_to(&spoof, h0).unwrap();
        }
    });
    const MALFORMED: &str =
        r#"flannel_dropped_packets_total{direction="ingress",reason="malformed"}"#;
    const SPOOFED: &str = r#"flannel_dropped_packets_total{direction="ingress",reason="spoofed"}"#;
    let after = wait_for("counters to move", Duration::from_secs(5), || {
        let m = http_get(&ns0, PORT, "/metrics")?.1;
        (metric(&m, MALFORMED) >= 7 && metric(&m, SPOOFED) >= 5).then_some(m)
    });
    let delta = |s: &str| metric(&after, s) - metric(&before, s);
    assert_eq!(delta(MALFORMED), 7);
    assert_eq!(delta(SPOOFED), 5);
    // Echo replies go out of h0: at least the 50 (plus whatever else ran).
    assert!(delta(r#"flannel_udp_packets_total{direction="sent"}"#) >= 50);
    assert!(delta(r#"flannel_tun_packets_total{direction="written"}"#) >= 50);
    assert!(delta(r#"flannel_udp_packets_total{direction="received"}"#) >= 62);
    assert_eq!(metric(&after, "flannel_peers"), 1);
    assert_eq!(metric(&after, "flannel_ready"), 1);
    assert!(after.contains("flannel_batch_size_bucket"));
    println!("sample scrape:\n{after}");
    // Prometheus' own linter accepts the exposition (names, units, types).
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt prometheus, scripts/deps.sh)");
    use std::io::Write as _;
    lint.stdin
        .take()
        .unwrap()
        .write_all(after.as_bytes())
        .unwrap();
    let lint = lint.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    assert!(
        lint.status.success() && said.trim().is_empty(),
        "promtool check metrics:\n{said}"
    );
    // Every metric is documented.
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    for name in after
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
    {
        assert!(
            doc.contains(&format!("`{name}`")),
            "{name} is not in docs/metrics.md"
        );
    }
    // SIGTERM: the endpoint goes away with the daemon.
    assert!(bed.stop(0, libc::SIGTERM).unwrap().success());
    assert!(http_get(&ns0, PORT, "/healthz").is_none());
}

#[test]
fn systemd_is_told_ready_and_stopping() {
    let bed = Bed::new(1);
    let sock_path = bed.dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut cmd = bed.flanneld_cmd(0, &[]);
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("READY notification");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("READY=1"), "{msg}");
    // Ready means: lease held, TUN up, subnet.env written.
    assert!(bed.hosts[0].subnet_file.exists());
    assert!(sh(&["ip", "-n", &bed.ns(0), "link", "show", "flannel0"]).contains("UP"));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("STOPPING notification");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(child.wait().unwrap().success());
}

#[test]
fn version_and_json_logs() {
    let out = Command::new(flanneld_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("flanneld {}", env!("CARGO_PKG_VERSION"))
    );
    let mut bed = Bed::new(1);
    bed.start(0, &["--log-format=json"]);
    bed.wait_subnet(0);
    bed.stop(0, libc::SIGTERM);
    let log = bed.log(0);
    let mut n = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
        n += 1;
    }
    assert!(n > 3, "{log}");
}

/// `docker run --cap-drop ALL --cap-add NET_ADMIN --device /dev/net/tun`, as setpriv.
#[test]
fn runs_with_only_cap_net_admin() {
    let mut bed = Bed::new(2);
    bed.start_ready(1);
    let h = &bed.hosts[0];
    let log = std::fs::File::create(bed.dir.join("capped.log")).unwrap();
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &h.ns,
            "setpriv",
            "--inh-caps=-all,+net_admin",
            "--ambient-caps=-all,+net_admin",
            "--bounding-set=-all,+net_admin",
            "--",
        ])
        .arg(flanneld_bin())
        .arg(format!("--etcd-endpoints={}", bed.endpoint))
        .arg(format!("--subnet-file={}", h.subnet_file.display()))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let sn = wait_child_lease(
        "a lease with only CAP_NET_ADMIN",
        &mut child,
        &h.subnet_file.clone(),
        &bed.dir.join("capped.log"),
    );
    // Its capabilities really are only NET_ADMIN (bit 12).
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let eff = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    assert_eq!(
        u64::from_str_radix(&eff, 16).unwrap(),
        1 << 12,
        "CapEff {eff}"
    );
    wait_for(
        "traffic with only CAP_NET_ADMIN",
        Duration::from_secs(10),
        || bed.ping(1, sn.network()).then_some(()),
    );
    let data = pattern(8 << 20, 1);
    assert!(tcp_transfer(&bed, 1, 0, data.clone()) == data);
    assert!(term_child(&mut child));
}

/// No capability at all: the TUN was made and configured by an administrator.
#[test]
fn uses_a_precreated_tun_without_any_capability() {
    let mut bed = Bed::new(2);
    bed.start_ready(1);
    // The admin reserves h0's subnet and prepares the device for it.
    bed.put(
        &format!("{PREFIX}/subnets/10.5.50.0-24"),
        &format!(r#"{{"PublicIP":"{}","PublicIPv6":null}}"#, bed.hosts[0].ip),
    );
    let ns = bed.ns(0);
    sh(&[
        "ip", "-n", &ns, "tuntap", "add", "name", "flannel0", "mode", "tun", "user", "0",
    ]);
    sh(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        "10.5.50.0/32",
        "dev",
        "flannel0",
    ]);
    sh(&[
        "ip", "-n", &ns, "link", "set", "flannel0", "mtu", "1472", "up",
    ]);
    sh(&[
        "ip",
        "-n",
        &ns,
        "route",
        "add",
        "10.5.0.0/16",
        "dev",
        "flannel0",
    ]);
    let h = &bed.hosts[0];
    let log = bed.dir.join("nocaps.log");
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "setpriv",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg(flanneld_bin())
        .arg(format!("--etcd-endpoints={}", bed.endpoint))
        .arg(format!("--subnet-file={}", h.subnet_file.display()))
        .args(["--no-netlink-config", "--tun-name=flannel0"])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(bed.dir.join("nocaps.err")).unwrap())
        .spawn()
        .unwrap();
    let sn = wait_child_lease(
        "a lease without capabilities",
        &mut child,
        &h.subnet_file.clone(),
        &bed.dir.join("nocaps.err"),
    );
    assert_eq!(sn.to_string(), "10.5.50.0/24");
    wait_for(
        "traffic through the pre-created TUN",
        Duration::from_secs(10),
        || bed.ping(1, sn.network()).then_some(()),
    );
    assert!(term_child(&mut child));
    // The administrator's device outlives the daemon.
    assert!(sh(&["ip", "-n", &ns, "link"]).contains("flannel0"));
}

#[test]
fn a_missing_dev_net_tun_is_a_clear_error() {
    let bed = Bed::new(1);
    let h = &bed.hosts[0];
    // A private mount namespace whose /dev/net is empty, like a minimal container.
    let script = format!(
        "mount -t tmpfs none /dev/net && exec {} --etcd-endpoints={} --subnet-file={}",
        flanneld_bin().display(),
        bed.endpoint,
        h.subnet_file.display()
    );
    let out = private_mounts(&h.ns, &script).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/dev/net/tun does not exist"), "{err}");
}

/// A non-root user with CAP_NET_ADMIN, where it may open /dev/net/tun. The
/// host's device stays 0600: the test gives the daemon a private mount
/// namespace with its own 0666 tun node (as a container runtime would).
#[test]
fn a_non_root_user_with_cap_net_admin_works() {
    let mut bed = Bed::new(2);
    bed.start_ready(1);
    let h = &bed.hosts[0];
    let dir = bed.dir.join("nobody");
    std::fs::create_dir_all(&dir).unwrap();
    sh(&["chmod", "0777", &dir.display().to_string()]);
    let subnet_file = dir.join("subnet.env");
    let script = format!(
        "mount -t tmpfs none /dev/net && mknod -m 0666 /dev/net/tun c 10 200 && \
         exec setpriv --reuid=65534 --regid=65534 --clear-groups \
         --inh-caps=-all,+net_admin --ambient-caps=-all,+net_admin --bounding-set=-all,+net_admin -- \
         {} --etcd-endpoints={} --subnet-file={} --iptables-forward-rules=false",
        flanneld_bin().display(),
        bed.endpoint,
        subnet_file.display()
    );
    let log = bed.dir.join("nobody.log");
    let mut child = private_mounts(&h.ns, &script)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let sn = wait_child_lease("a lease as uid 65534", &mut child, &subnet_file, &log);
    // The daemon really runs as uid 65534 (the shell exec'd setpriv, which exec'd it).
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    assert!(uid.split_whitespace().nth(2) == Some("65534"), "{uid}");
    wait_for(
        "traffic to the non-root daemon",
        Duration::from_secs(10),
        || bed.ping(1, sn.network()).then_some(()),
    );
    assert!(term_child(&mut child));
}

/// `sh -c script` in host namespace `ns` and a private mount namespace (as a
/// container runtime gives a container its own /dev).
fn private_mounts(ns: &str, script: &str) -> Command {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        ns,
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
    ]);
    c
}

/// A flood to an unleased subnet gets ICMP net-unreachable answers within
/// the rate limit (1000/s and a burst of 50, one limit for all workers:
/// the flood comes from 16 flows spread over 4 TUN queues), the rest counted.
#[test]
fn icmp_errors_are_rate_limited() {
    const P: u16 = 9117;
    let mut bed = Bed::new(1);
    bed.start_ready_with(0, &[&format!("--healthz-port={P}"), "--workers=4"]);
    let ns0 = bed.ns(0);
    let t = std::time::Instant::now();
    in_ns(&ns0, || {
        let socks: Vec<UdpSocket> = (0..16)
            .map(|_| UdpSocket::bind("0.0.0.0:0").unwrap())
            .collect();
        for k in 0..20_000 {
            let _ = socks[k % 16].send_to(b"x", "10.5.250.9:9");
        }
    });
    let secs = t.elapsed().as_secs_f64();
    // Some of the flood may die in the TUN queue; what reached us is
    // counted as no_route. Wait until that count stops moving.
    const NO_ROUTE: &str = r#"flannel_dropped_packets_total{direction="egress",reason="no_route"}"#;
    let mut last = u64::MAX;
    let m = wait_for("the flood to be counted", Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(100));
        let m = http_get(&ns0, P, "/metrics")?.1;
        let n = metric(&m, NO_ROUTE);
        let settled = n == last && n > 0;
        last = n;
        settled.then_some(m)
    });
    let offenders = metric(&m, NO_ROUTE);
    let sent = metric(&m, "flannel_icmp_sent_total");
    let limited = metric(&m, "flannel_icmp_ratelimited_total");
    println!("20000 packets to an unleased subnet sent in {secs:.2} s, {offenders} reached the daemon: {sent} ICMP errors sent, {limited} rate-limited");
    assert_eq!(
        sent + limited,
        offenders,
        "each offender answered or counted"
    );
    assert!(limited > 0, "a flood must hit the limit");
    assert!(sent >= 50, "at least the burst is answered");
    // Everything happened within `total` seconds of the flood's start.
    let total = t.elapsed().as_secs_f64();
    assert!(
        (sent as f64) <= 50.0 + 1000.0 * total,
        "{sent} ICMP errors in {total:.2} s exceed 1000/s + burst"
    );
}

/// Descriptors the process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn a_flood_of_idle_clients_on_the_ops_port_neither_exhausts_descriptors_nor_blocks_health() {
    // The test process holds 1100 sockets: raise its own limit.
    let lim = libc::rlimit {
        rlim_cur: 8192,
        rlim_max: 8192,
    };
    // SAFETY: setrlimit with a valid struct, for this test process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let mut bed = Bed::new(1);
    const P: u16 = 9131;
    // The daemon keeps the default soft limit (1024) a unit without
    // LimitNOFILE gives it: the cap, not the limit, must protect it.
    bed.start_ready_with(0, &[&format!("--healthz-port={P}")]);
    let pid = bed.daemon_pid(0);
    let before = open_fds(pid);
    let ns = bed.ns(0);
    let flood = in_ns(&ns, move || {
        (0..1100)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from(([127, 0, 0, 1], P)),
                    Duration::from_millis(500),
                )
                .ok()
            })
            .collect::<Vec<_>>()
    });
    assert!(flood.len() > 1000, "only {} clients connected", flood.len());
    let during = open_fds(pid);
    assert!(
        during < before + 200,
        "the daemon holds {during} descriptors with 1100 idle clients (before: {before})"
    );
    // Health answers while the idle clients stay connected: each held
    // slot is freed by its deadline.
    let (code, _) = wait_for("/healthz during the flood", Duration::from_secs(10), || {
        http_get(&ns, P, "/healthz")
    });
    assert_eq!(code, 200);
    let m = wait_for("/metrics", Duration::from_secs(10), || {
        http_get(&ns, P, "/metrics")
    })
    .1;
    assert!(
        metric(&m, "flannel_ops_connections_refused_total") > 900,
        "{m}"
    );
    // The data path still opens descriptors fine: the daemon is alive.
    assert!(bed.is_running(0), "{}", bed.log(0));
    drop(flood);
}
