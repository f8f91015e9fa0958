//! The wireguard backend against the real thing: a namespaced host running
//! Debian's wireguard-go as Go flanneld's wireguard backend programs it (see
//! `support::wg_node`) and our flanneld share one real etcd and exchange
//! encrypted traffic; ours also talk to each other.

mod support;

use std::net::{Ipv4Addr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::wg_node::{WgNode, DEV};
use support::*;

const WG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard"}}"#;
const REF_SUBNET: &str = "10.5.200.0/24";
const MARKER: &[u8] = b"flannel-rs-plaintext-marker-5f3c9a";

/// Host `i`'s lease value in etcd, checked to be a wireguard lease.
fn lease_of(bed: &Bed, i: usize) -> serde_json::Value {
    bed.own_lease(i, "wireguard")
}

fn public_key_in_etcd(bed: &Bed, i: usize) -> String {
    lease_of(bed, i)["BackendData"]["PublicKey"]
        .as_str()
        .unwrap()
        .to_string()
}

fn key_file(bed: &Bed, i: usize) -> std::path::PathBuf {
    bed.hosts[i].subnet_file.with_file_name("wgkey")
}

/// `wg pubkey` of a private key: an independent derivation.
fn wg_pubkey(private: &str) -> String {
    use std::io::Write;
    let mut c = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(private.as_bytes())
        .unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success());
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

fn ping_from(ns: &str, src: &str, dst: Ipv4Addr) -> bool {
    ping_with(ns, &["-c", "3", "-i", "0.3", "-W", "1", "-I", src], dst)
}

fn dropped(m: &str, reason: &str) -> u64 {
    metric(
        m,
        &format!(r#"flannel_dropped_packets_total{{direction="ingress",reason="{reason}"}}"#),
    )
}

fn tun_written(m: &str) -> u64 {
    metric(m, r#"flannel_tun_packets_total{direction="written"}"#)
}

/// Every frame seen on every interface of a namespace (AF_PACKET, ETH_P_ALL),
/// until stopped.
struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl Sniffer {
    fn start(ns: &str) -> Sniffer {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = spawn_in_ns(ns, move || {
            // SAFETY: plain socket calls on a descriptor this closure owns.
            unsafe {
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                );
                assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of_val(&tv) as u32,
                );
                let big: libc::c_int = 32 << 20;
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    &big as *const _ as *const libc::c_void,
                    4,
                );
                ready_tx.send(()).unwrap();
                let mut frames = Vec::new();
                let mut buf = vec![0u8; 65536];
                while !flag.load(Ordering::Relaxed) {
                    let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
                    if n > 0 {
                        frames.push(buf[..n as usize].to_vec());
                    }
                }
                libc::close(fd);
                frames
            }
        });
        ready_rx.recv().unwrap();
        Sniffer { stop, thread }
    }

    fn finish(self) -> Vec<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// (source, destination, protocol) of an Ethernet/IPv4 frame.
fn ip_of(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u8)> {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] || frame[14] >> 4 != 4 {
        return None;
    }
    let ip = &frame[14..];
    Some((
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ip[9],
    ))
}

/// (source, destination, destination port, payload) of an Ethernet/IPv4/UDP frame.
fn udp_of(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u16, &[u8])> {
    if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if ip[0] >> 4 != 4 || ip[9] != 17 || ip.len() < ihl + 8 {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let udp = &ip[ihl..];
    Some((src, dst, u16::from_be_bytes([udp[2], udp[3]]), &udp[8..]))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Sends `n` datagrams carrying [`MARKER`] from `from_ns` to `dst:port`.
fn send_marked(from_ns: &str, dst: Ipv4Addr, port: u16, n: usize) {
    in_ns(from_ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for k in 0..n {
            let mut d = MARKER.to_vec();
            d.extend_from_slice(&[k as u8; 100]);
            let _ = s.send_to(&d, (dst, port));
            std::thread::sleep(Duration::from_millis(2));
        }
    });
}

/// Sends each payload as one UDP datagram from the hub to `dst:port`.
fn inject(bed: &Bed, dst: Ipv4Addr, port: u16, payloads: Vec<Vec<u8>>) {
    in_ns(&bed.hub, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for p in payloads {
            s.send_to(&p, (dst, port)).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

#[test]
fn wireguard_go_and_ours_exchange_encrypted_traffic_and_refuse_forgeries() {
    let _g = heavy();
    let mut bed = bed_with(WG, 3);
    let mut r = WgNode::new(&bed, 0, REF_SUBNET, 51820, None, 0);
    bed.start_ready_with(1, &["--healthz-port=9311"]);
    bed.start_ready_with(2, &["--healthz-port=9312"]);
    // Our devices, leases and key files look like flannel's.
    for i in [1, 2] {
        let link = sh(&["ip", "-n", &bed.ns(i), "link", "show", DEV]);
        assert!(link.contains("mtu 1420"), "{link}");
        let env = std::fs::read_to_string(&bed.hosts[i].subnet_file).unwrap();
        assert!(env.contains("FLANNEL_MTU=1420"), "{env}");
        let v = lease_of(&bed, i);
        assert_eq!(v["BackendData"]["Port"], 51820, "{v}");
        let kf = key_file(&bed, i);
        assert_eq!(
            std::fs::metadata(&kf).unwrap().permissions().mode() & 0o777,
            0o400
        );
        let private = std::fs::read_to_string(&kf).unwrap();
        assert_eq!(wg_pubkey(private.trim()), public_key_in_etcd(&bed, i));
        // The private key is nowhere but in its file.
        let m = scrape(&bed, i, 9310 + i as u16);
        for (what, text) in [("subnet.env", &env), ("log", &bed.log(i)), ("metrics", &m)] {
            assert!(!text.contains(private.trim()), "private key in {what}");
        }
        let ss = sh(&["ip", "netns", "exec", &bed.ns(i), "ss", "-uln"]);
        assert!(ss.contains(":51820 "), "{ss}");
    }
    r.sync(&bed);
    let rip = r.subnet.network();
    let (a1, a2) = (bed.tun_addr(1), bed.tun_addr(2));
    for (from, to) in [(0, a1), (0, a2), (1, rip), (2, rip), (1, a2), (2, a1)] {
        wait_for(&format!("h{from} -> {to}"), Duration::from_secs(15), || {
            bed.ping(from, to).then_some(())
        });
    }
    // Full-size packets with DF: 1420 − 28 bytes of ICMP payload.
    for (from, to) in [(0, a1), (1, rip), (1, a2), (2, a1)] {
        assert!(ping_df(&bed.ns(from), to, 1392), "DF 1420 h{from} -> {to}");
    }
    assert!(
        !ping_df(&bed.ns(1), a2, 1393),
        "1421 bytes with DF went through"
    );

    // Bulk TCP, byte for byte, both directions, reference ↔ ours and ours ↔ ours.
    let data = pattern(16 << 20, 11);
    for (from, to) in [(0usize, 1usize), (1, 0), (1, 2), (2, 1)] {
        let dst = if to == 0 { rip } else { bed.tun_addr(to) };
        assert_tcp_intact(&bed, from, to, dst, &data);
    }

    // The underlay sees no plaintext: a sniffer on the hub's bridge catches
    // every frame. The control datagram, sent in clear over the underlay,
    // shows the sniffer would see the marker.
    let sniff = Sniffer::start(&bed.hub);
    send_marked(&bed.ns(0), a1, 7777, 20);
    send_marked(&bed.ns(1), rip, 7777, 20);
    send_marked(&bed.ns(1), a2, 7777, 20);
    send_marked(&bed.ns(2), a1, 7777, 20);
    send_marked(&bed.ns(1), bed.hosts[2].ip, 9, 1);
    let frames = sniff.finish();
    // The control, and h2's ICMP port unreachable quoting it, are the only
    // frames with the marker in them.
    let h2 = bed.hosts[2].ip;
    let marked: Vec<_> = frames
        .iter()
        .filter(|f| contains(f, MARKER))
        .map(|f| (ip_of(f), udp_of(f).map(|(_, d, p, _)| (d, p))))
        .collect();
    assert!(
        marked.iter().any(|(_, u)| *u == Some((h2, 9))),
        "the sniffer saw not even the control: {} frames",
        frames.len()
    );
    assert!(
        marked
            .iter()
            .all(|(ip, u)| *u == Some((h2, 9)) || matches!(ip, Some((s, _, 1)) if *s == h2)),
        "plaintext on the underlay: {marked:?}"
    );
    let tunnel: Vec<(Ipv4Addr, Ipv4Addr, Vec<u8>)> = frames
        .iter()
        .filter_map(|f| udp_of(f))
        .filter(|&(_, _, p, pl)| p == 51820 && pl[0] == 4 && pl.len() > MARKER.len())
        .map(|(s, d, _, pl)| (s, d, pl.to_vec()))
        .collect();
    assert!(tunnel.len() >= 80, "{} tunnel datagrams seen", tunnel.len());

    // Replayed captures of the reference's data to h1, from the hub: each is
    // refused and nothing reaches h1's pod side.
    let mut replay: Vec<Vec<u8>> = tunnel
        .iter()
        .filter(|(s, d, _)| *s == bed.hosts[0].ip && *d == bed.hosts[1].ip)
        .map(|(_, _, pl)| pl.clone())
        .collect();
    replay.sort();
    replay.dedup();
    assert!(replay.len() >= 20, "{} captures to replay", replay.len());
    let before = scrape(&bed, 1, 9311);
    let n_replay = replay.len() as u64;
    inject(&bed, bed.hosts[1].ip, 51820, replay);
    // Garbage of every message type and of none.
    let mut garbage = Vec::new();
    for (k, len) in [(1u8, 148), (2, 92), (3, 64), (4, 32), (4, 200), (9, 100)] {
        for j in 0..20u8 {
            let mut d = pattern(len, (k as u64) << 8 | j as u64);
            d[0] = k;
            d[1..4].fill(0);
            garbage.push(d);
        }
    }
    let n_garbage = garbage.len() as u64;
    inject(&bed, bed.hosts[1].ip, 51820, garbage);
    std::thread::sleep(Duration::from_millis(500));
    let after = scrape(&bed, 1, 9311);
    assert_eq!(
        tun_written(&after),
        tun_written(&before),
        "forgeries written"
    );
    let refused = dropped(&after, "unauthenticated") - dropped(&before, "unauthenticated");
    assert!(
        refused >= n_replay + n_garbage,
        "{refused} refused of {n_replay} replays and {n_garbage} garbage"
    );

    // A valid peer's packets with a forged inner source: the reference owns
    // 10.5.200.0/24 only, so 10.5.77.7 is dropped after decryption.
    sh(&[
        "ip",
        "-n",
        r.ns(),
        "addr",
        "add",
        "10.5.77.7/32",
        "dev",
        DEV,
    ]);
    let before = scrape(&bed, 1, 9311);
    assert!(
        !ping_from(r.ns(), "10.5.77.7", a1),
        "forged source answered"
    );
    let after = scrape(&bed, 1, 9311);
    assert!(dropped(&after, "spoofed") >= dropped(&before, "spoofed") + 3);
    assert_eq!(tun_written(&after), tun_written(&before), "spoofed written");
    sh(&[
        "ip",
        "-n",
        r.ns(),
        "addr",
        "del",
        "10.5.77.7/32",
        "dev",
        DEV,
    ]);

    // And the daemons keep routing.
    for (from, to) in [(0, a1), (1, rip), (2, a1)] {
        assert!(bed.ping(from, to), "h{from} -> {to} after the forgeries");
    }
    assert!(bed.is_running(1) && bed.is_running(2));
}

#[test]
fn a_restart_keeps_the_key_a_new_key_is_followed_and_a_deleted_lease_is_unreachable() {
    let _g = heavy();
    let mut bed = bed_with(WG, 2);
    let mut r = WgNode::new(&bed, 0, REF_SUBNET, 51820, None, 0);
    // Leases no wireguard peer can be made of: another backend, a bad key,
    // an all-zero key.
    let foreign = [
        (
            "10.5.201.0-24",
            r#"{"PublicIP":"192.168.100.50","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:00:00:00:00:01"}}"#,
        ),
        (
            "10.5.202.0-24",
            r#"{"PublicIP":"192.168.100.51","BackendType":"wireguard","BackendData":{"PublicKey":"bm90IGEga2V5","Port":51820}}"#,
        ),
        (
            "10.5.203.0-24",
            r#"{"PublicIP":"192.168.100.52","BackendType":"wireguard","BackendData":{"PublicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","Port":51820}}"#,
        ),
    ];
    for (sn, v) in foreign {
        bed.put(&format!("{PREFIX}/subnets/{sn}"), v);
    }
    bed.start_ready_with(1, &["--healthz-port=9314"]);
    let (rip, a1) = (r.subnet.network(), bed.tun_addr(1));
    let log = bed.log(1);
    for (sn, _) in foreign {
        bed.assert_lease_ignored(1, &log, sn);
    }
    assert_eq!(metric(&scrape(&bed, 1, 9314), "flannel_leases_ignored"), 3);
    for (sn, _) in foreign {
        bed.del(&format!("{PREFIX}/subnets/{sn}"));
    }
    r.sync(&bed);
    wait_for("ref -> ours", Duration::from_secs(15), || {
        bed.ping(0, a1).then_some(())
    });
    let key = public_key_in_etcd(&bed, 1);
    bed.stop(1, libc::SIGTERM);
    bed.start(1, &[]);
    bed.wait_subnet(1);
    assert_eq!(
        public_key_in_etcd(&bed, 1),
        key,
        "a restart changed the key"
    );
    assert_eq!(bed.tun_addr(1), a1);
    // The reference was not reprogrammed: the same key must still work.
    wait_for(
        "ref -> ours after a restart",
        Duration::from_secs(10),
        || bed.ping(0, a1).then_some(()),
    );
    assert!(bed.ping(1, rip));

    // The reference comes back with a new key (its key file was lost):
    // ours follow the lease.
    let old = r.public.clone();
    r.new_key(&bed);
    assert_ne!(r.public, old);
    wait_for(
        "ours -> ref with its new key",
        Duration::from_secs(15),
        || bed.ping(1, rip).then_some(()),
    );
    assert!(bed.ping(0, a1));

    // The reference's lease goes: no more route to it.
    bed.del(&key_of(r.subnet));
    let probe = Ipv4Addr::new(10, 5, 200, 9);
    wait_for("ref subnet unrouted", Duration::from_secs(10), || {
        (udp_probe_error(&bed, 1, probe) == Some(libc::ENETUNREACH)).then_some(())
    });
    assert!(
        !bed.ping_wait(1, rip, "1"),
        "a deleted lease is still reachable"
    );
}

#[test]
fn psk_listen_port_and_keepalive_from_the_config_take_effect() {
    let psk = "K8fz0eG0pJ2x1vQw3sYk0pX7m9U5cWb6nT4rA1dE2fI=";
    let wrong = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let cfg = format!(
        r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"wireguard","ListenPort":51999,"PSK":"{psk}","PersistentKeepaliveInterval":2}}}}"#
    );
    // One wireguard-go at a time: its UAPI socket is named by the device.
    let _g = heavy();
    let mut bed = bed_with(&cfg, 3);
    // The reference starts with the wrong PSK.
    let mut r = WgNode::new(&bed, 0, REF_SUBNET, 51999, Some(wrong), 2);
    bed.start_ready_with(1, &["--healthz-port=9313"]);
    bed.start_ready(2);
    for i in [1, 2] {
        let ss = sh(&["ip", "netns", "exec", &bed.ns(i), "ss", "-uln"]);
        assert!(ss.contains(":51999 "), "{ss}");
        assert!(!ss.contains(":51820 "), "{ss}");
        assert_eq!(lease_of(&bed, i)["BackendData"]["Port"], 51999);
    }
    // Ours share the PSK: they reach each other.
    let (a1, a2) = (bed.tun_addr(1), bed.tun_addr(2));
    wait_for("h1 -> h2 with the PSK", Duration::from_secs(15), || {
        bed.ping(1, a2).then_some(())
    });
    r.sync(&bed);
    let rip = r.subnet.network();
    let before = scrape(&bed, 1, 9313);
    for _ in 0..3 {
        assert!(!bed.ping(0, a1), "a wrong PSK got through");
        assert!(!bed.ping(1, rip), "a wrong PSK got through");
    }
    let after = scrape(&bed, 1, 9313);
    assert_eq!(tun_written(&after), tun_written(&before));
    assert!(
        dropped(&after, "unauthenticated") > dropped(&before, "unauthenticated"),
        "{after}"
    );
    // The right PSK: through.
    r.set_psk(&bed, psk);
    r.sync(&bed);
    wait_for("ref -> ours with the PSK", Duration::from_secs(20), || {
        bed.ping(0, a1).then_some(())
    });
    assert!(bed.ping(1, rip));
    // Keepalive every 2 s: the reference keeps receiving from h1 while idle.
    let k1 = public_key_in_etcd(&bed, 1);
    let (rx0, _) = r.transfer(&k1);
    std::thread::sleep(Duration::from_secs(7));
    let (rx1, _) = r.transfer(&k1);
    assert!(
        rx1 >= rx0 + 2 * 32,
        "no keepalives from h1 while idle: {rx0} -> {rx1}"
    );
}

/// A restart while etcd does not answer runs from the peer cache: the
/// peers' public keys and ports come from it (a wrong key or port would get
/// no handshake through), and both the reference and our other host are
/// reached with the key our restarted host keeps.
#[test]
fn a_restart_while_etcd_is_stopped_reaches_wireguard_peers_from_the_peer_cache() {
    let _g = heavy();
    // Ours listen on 51999; the reference's lease says 51820: the cache
    // must keep each peer's own port.
    let config = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard","ListenPort":51999}}"#;
    let mut bed = bed_with(config, 3);
    let mut r = WgNode::new(&bed, 0, REF_SUBNET, 51820, None, 0);
    bed.start_ready(1);
    bed.start_ready(2);
    r.sync(&bed);
    let (rip, a1, a2) = (r.subnet.network(), bed.tun_addr(1), bed.tun_addr(2));
    for (what, from, to) in [
        ("ref -> h1", 0, a1),
        ("h1 -> h2", 1, a2),
        ("h2 -> ref", 2, rip),
    ] {
        wait_for(what, Duration::from_secs(15), || {
            bed.ping(from, to).then_some(())
        });
    }
    let (key, key2) = (public_key_in_etcd(&bed, 1), public_key_in_etcd(&bed, 2));

    // etcd frozen: it accepts connections and never answers.
    let etcd = bed.etcd_pid();
    // SAFETY: signalling the test's own etcd child.
    unsafe { libc::kill(etcd, libc::SIGSTOP) };
    struct Thaw(i32);
    impl Drop for Thaw {
        fn drop(&mut self) {
            // SAFETY: as above; a failing assertion must not leave it stopped.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    let thaw = Thaw(etcd);
    assert!(bed.stop(1, libc::SIGTERM).unwrap().success());
    bed.start(1, &[]);
    for (what, from, to) in [
        ("h1 -> h2 from the cache", 1, a2),
        ("h2 -> h1 after the restart", 2, a1),
        ("h1 -> ref from the cache", 1, rip),
        ("ref -> h1 after the restart", 0, a1),
    ] {
        wait_for(what, Duration::from_secs(15), || {
            bed.ping_wait(from, to, "0.5").then_some(())
        });
    }
    let log = bed.log(1);
    assert!(log.contains("starting from the peer cache"), "{log}");
    assert_eq!(bed.tun_addr(1), a1);
    // What the cache holds: the peers' keys and ports, never our private key.
    let cache = std::fs::read_to_string(
        bed.hosts[1]
            .subnet_file
            .with_file_name("subnet.env.peers.json"),
    )
    .expect("the peer cache");
    assert!(cache.contains(&r.public), "{cache}");
    assert!(cache.contains(&key2), "{cache}");
    let private = std::fs::read_to_string(key_file(&bed, 1)).unwrap();
    assert!(
        !cache.contains(private.trim()),
        "the private key is in the peer cache"
    );

    // etcd back: the lease is confirmed with the same key.
    drop(thaw);
    wait_for("h1 to confirm its lease", Duration::from_secs(30), || {
        bed.log(1)
            .contains("our lease is confirmed in etcd")
            .then_some(())
    });
    assert_eq!(public_key_in_etcd(&bed, 1), key, "the key changed");
    assert!(bed.ping(1, rip) && bed.ping(0, a1));
}
