//! The lease core against the real etcd: leases of other writers that are
//! not flannel's shape, junk past the client's reply limit, a takeover of
//! our subnet, a stolen lease that must not be overwritten by a renewal.
//! Each heals without a restart; the same paths are unit tests of
//! `lease::keeper` against the in-memory store.

mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use support::*;

/// The subnet host `i`'s subnet.env names now.
fn subnet_of(bed: &Bed, i: usize) -> Option<ipnetwork::Ipv4Network> {
    flannel::subnet_env::read_previous_subnet(&bed.hosts[i].subnet_file)
}

fn lease_value(ip: Ipv4Addr) -> String {
    format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null}}"#)
}

#[test]
fn leases_of_another_shape_never_route_never_block_and_are_counted() {
    const PORT: u16 = 9121;
    let mut bed = Bed::new(3);
    let sn0 = bed.start_ready_with(0, &[&format!("--healthz-port={PORT}")]);
    bed.start_ready(1);
    let h0 = bed.tun_addr(0);
    wait_for("h1 -> h0", Duration::from_secs(10), || {
        bed.ping(1, h0).then_some(())
    });
    // A broken or hostile member writes: the whole Network, everything,
    // the half of h0's /24 that holds h0's TUN address (pointing at h2, so
    // a hijack would black-hole h1's traffic to h0), a /24 whose PublicIP
    // is loopback.
    let rogue_ip = bed.hosts[2].ip;
    let half = format!("{}-25", sn0.network());
    let rogue = [
        ("10.5.0.0-16".to_string(), lease_value(rogue_ip)),
        ("0.0.0.0-0".to_string(), lease_value(rogue_ip)),
        (half.clone(), lease_value(rogue_ip)),
        (
            "10.5.250.0-24".to_string(),
            lease_value(Ipv4Addr::LOCALHOST),
        ),
    ];
    for (k, v) in &rogue {
        bed.put(&format!("{PREFIX}/subnets/{k}"), v);
    }
    let ns0 = bed.ns(0);
    let scrape = || http_get(&ns0, PORT, "/metrics").expect("metrics").1;
    wait_for(
        "h0 to count the rogue leases",
        Duration::from_secs(10),
        || (metric(&scrape(), "flannel_leases_ignored") == 4).then_some(()),
    );
    // No hijack: h1 still reaches h0's TUN address inside the rogue /25,
    // and h0 routes to exactly one peer.
    for _ in 0..5 {
        assert!(bed.ping(1, h0), "h1 -> h0 hijacked by {half}");
    }
    assert_eq!(metric(&scrape(), "flannel_peers"), 1);
    // Nothing blocked: a new host joins with 0.0.0.0-0 and the /16 present.
    let sn2 = bed.start_ready(2);
    assert_eq!(sn2.prefix(), 24);
    let h2 = bed.tun_addr(2);
    wait_for("h0 -> h2", Duration::from_secs(10), || {
        bed.ping(0, h2).then_some(())
    });
    // Warned once per key, by h0 and by the newcomer alike.
    for i in [0, 2] {
        let log = bed.log(i);
        for (k, _) in &rogue {
            let n = log
                .lines()
                .filter(|l| l.contains("ignoring lease") && l.contains(&format!("/{k}:")))
                .count();
            assert_eq!(n, 1, "h{i} warned {n} times about {k}:\n{log}");
        }
    }
    // A rogue key deleted is no longer counted.
    bed.del(&format!("{PREFIX}/subnets/{half}"));
    wait_for("the count to drop", Duration::from_secs(10), || {
        (metric(&scrape(), "flannel_leases_ignored") == 3).then_some(())
    });
}

#[test]
fn junk_beyond_the_reply_limit_does_not_stop_a_host_from_joining() {
    let mut bed = Bed::new(2);
    bed.start_ready(0);
    // 4.5 MB of junk under the subnets prefix: more than the gRPC client's
    // default 4 MiB reply limit in one list.
    let junk = "j".repeat(100_000);
    for i in 0..45 {
        bed.put(&format!("{PREFIX}/subnets/junk-{i}"), &junk);
    }
    let t = Instant::now();
    let sn1 = bed.start_ready(1);
    println!("joined past 4.5 MB of junk in {:?}", t.elapsed());
    assert_eq!(sn1.prefix(), 24);
    let h1 = bed.tun_addr(1);
    wait_for("h0 -> h1", Duration::from_secs(10), || {
        bed.ping(0, h1).then_some(())
    });
    // Every junk key was reported, and never by its whole value.
    for i in [0, 1] {
        let log = bed.log(i);
        let longest = log.lines().map(str::len).max().unwrap_or(0);
        assert!(longest < 2_000, "h{i} logged a {longest}-byte line");
    }
    let log = bed.log(1);
    assert!(log.contains("junk-44"), "{log}");
}

#[test]
fn the_new_owner_of_our_subnet_is_routed_to_at_once_and_we_move() {
    let mut bed = Bed::new(2);
    let sn0 = bed.start_ready(0);
    let sn1 = bed.start_ready(1);
    assert!(bed.stop(1, libc::SIGTERM).unwrap().success());
    bed.del(&key_of(sn1));
    // h1's address takes h0's subnet in one write (a host restored from an
    // old backup, an operator's reassignment), and writes it no more for a
    // day. h1 runs no daemon: a plain socket on 8285 shows what h0 sends.
    let h1_ip = bed.hosts[1].ip;
    let rx = spawn_in_ns(&bed.ns(1), move || {
        let s = std::net::UdpSocket::bind((h1_ip, 8285)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut b = [0u8; 2048];
        let (n, _) = s.recv_from(&mut b).ok()?;
        Some(b[..n].to_vec())
    });
    let t = Instant::now();
    bed.put(&key_of(sn0), &lease_value(h1_ip));
    let moved = wait_for("h0 to move", Duration::from_secs(10), || {
        subnet_of(&bed, 0).filter(|sn| *sn != sn0)
    });
    println!("h0 moved {sn0} -> {moved} in {:?}", t.elapsed());
    // Before, the event that showed the takeover was consumed without
    // adding h1: sn0 was unroutable from h0 until a re-list or h1's
    // renewal (a day). Now h0 tunnels sn0's traffic to h1 at once.
    let dst = Ipv4Addr::from(u32::from(sn0.network()) + 5);
    let ns0 = bed.ns(0);
    in_ns(&ns0, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..20 {
            let _ = s.send_to(b"to the new owner", (dst, 9));
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let got = rx.join().unwrap().expect("nothing reached h1:8285");
    let pkt = flannel::wire::Ipv4Packet::new_checked(&got[..]).expect("an IPv4 packet");
    assert_eq!(pkt.dst(), dst);
    assert!(got.ends_with(b"to the new owner"));
    let log = bed.log(0);
    assert!(
        log.contains(&format!("peer added subnet={sn0} public_ip={h1_ip}")),
        "{log}"
    );
    // The new owner's lease was not touched by h0.
    let (_, v) = bed
        .leases()
        .into_iter()
        .find(|(k, _)| *k == key_of(sn0))
        .unwrap();
    assert!(v.contains(&format!("\"{h1_ip}\"")), "{v}");
}

#[test]
fn a_renewal_never_overwrites_a_lease_another_host_wrote_meanwhile() {
    let mut bed = Bed::new(2);
    // A 6 s TTL (hidden test flag): renewal due 3 s after each write.
    let sn0 = bed.start_ready_with(0, &["--subnet-lease-ttl=6"]);
    // Frozen past its renewal time while another host writes its key.
    bed.signal(0, libc::SIGSTOP);
    let other = Ipv4Addr::new(192, 168, 100, 77);
    bed.put(&key_of(sn0), &lease_value(other));
    std::thread::sleep(Duration::from_secs(4));
    bed.signal(0, libc::SIGCONT);
    let moved = wait_for("h0 to move", Duration::from_secs(10), || {
        subnet_of(&bed, 0).filter(|sn| *sn != sn0)
    });
    // Whichever h0 saw first (the watch event or its renewal timer), the
    // other host's lease is intact, and h0 holds its new subnet.
    std::thread::sleep(Duration::from_millis(500));
    let leases = bed.leases();
    let v = &leases.iter().find(|(k, _)| *k == key_of(sn0)).unwrap().1;
    assert!(v.contains(&format!("\"{other}\"")), "{v}");
    let mine = &leases.iter().find(|(k, _)| *k == key_of(moved)).unwrap().1;
    assert!(mine.contains(&format!("\"{}\"", bed.hosts[0].ip)), "{mine}");
    assert!(bed.is_running(0), "{}", bed.log(0));
}

#[test]
fn a_restart_while_etcd_is_stopped_forwards_from_the_peer_cache() {
    let mut bed = Bed::new(3);
    let sn0 = bed.start_ready(0);
    bed.start_ready(1);
    let (h0, h1) = (bed.tun_addr(0), bed.tun_addr(1));
    wait_for("h0 -> h1", Duration::from_secs(10), || {
        bed.ping(0, h1).then_some(())
    });
    // etcd frozen: it accepts connections and never answers.
    let etcd = bed.etcd_pid();
    // SAFETY: signalling the test's own etcd child.
    unsafe { libc::kill(etcd, libc::SIGSTOP) };
    assert!(bed.stop(0, libc::SIGTERM).unwrap().success());
    let t = Instant::now();
    bed.start(0, &[]);
    wait_for("h0 -> h1 after the restart", Duration::from_secs(5), || {
        bed.ping_wait(0, h1, "0.1").then_some(())
    });
    wait_for("h1 -> h0 after the restart", Duration::from_secs(5), || {
        bed.ping_wait(1, h0, "0.1").then_some(())
    });
    println!(
        "restarted with etcd stopped: traffic both ways {:?} after the start",
        t.elapsed()
    );
    assert!(
        bed.log(0).contains("starting from the peer cache"),
        "{}",
        bed.log(0)
    );
    // etcd back: h0 confirms its lease, and a new host is reachable.
    // SAFETY: as above.
    unsafe { libc::kill(etcd, libc::SIGCONT) };
    let t = Instant::now();
    bed.start_ready(2);
    let h2 = bed.tun_addr(2);
    wait_for("h0 -> h2", Duration::from_secs(30), || {
        bed.ping(0, h2).then_some(())
    });
    println!(
        "after etcd returned, a new host was reachable in {:?}",
        t.elapsed()
    );
    wait_for("h0 to confirm its lease", Duration::from_secs(20), || {
        bed.log(0)
            .contains("our lease is confirmed in etcd")
            .then_some(())
    });
    let (_, v) = bed
        .leases()
        .into_iter()
        .find(|(k, _)| *k == key_of(sn0))
        .expect("h0's lease");
    assert!(v.contains(&format!("\"{}\"", bed.hosts[0].ip)), "{v}");
    assert_eq!(subnet_of(&bed, 0), Some(sn0));
}

/// A start from the peer cache runs on the config the node last saw; when
/// etcd answers, flanneld reads the config as a start would have, and exits
/// (for its supervisor to restart it) when it is not the one it runs on.
#[test]
fn a_config_changed_while_running_from_the_peer_cache_ends_that_run() {
    let mut bed = Bed::new(2);
    let sn0 = bed.start_ready(0);
    bed.start_ready(1);
    assert!(bed.stop(0, libc::SIGTERM).unwrap().success());
    // Meanwhile the network's config changes (h0's subnet still fits it).
    let changed = r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.200.0","Backend":{"Type":"udp"}}"#;
    bed.put(&format!("{PREFIX}/config"), changed);
    let etcd = bed.etcd_pid();
    // SAFETY: signalling the test's own etcd child.
    unsafe { libc::kill(etcd, libc::SIGSTOP) };
    bed.start(0, &[]);
    let h1 = bed.tun_addr(1);
    wait_for("h0 -> h1 from the cache", Duration::from_secs(10), || {
        bed.ping_wait(0, h1, "0.1").then_some(())
    });
    assert!(
        bed.log(0).contains("starting from the peer cache"),
        "{}",
        bed.log(0)
    );
    // SAFETY: as above.
    unsafe { libc::kill(etcd, libc::SIGCONT) };
    let status = wait_for(
        "h0 to exit on etcd's config",
        Duration::from_secs(30),
        || bed.exit_status(0),
    );
    assert!(!status.success(), "{status:?}");
    assert!(
        bed.log(0).contains("is not the one in the peer cache"),
        "{}",
        bed.log(0)
    );
    // Restarted, it runs on etcd's config (no second start from the
    // cache), in the subnet it held.
    bed.stop(0, libc::SIGTERM); // reaps the exited child
    bed.start(0, &[]);
    wait_for(
        "h0 -> h1 after the restart",
        Duration::from_secs(15),
        || bed.ping(0, h1).then_some(()),
    );
    let log = bed.log(0);
    assert_eq!(
        log.matches("starting from the peer cache").count(),
        1,
        "{log}"
    );
    assert_eq!(subnet_of(&bed, 0), Some(sn0));
    assert!(bed.is_running(0), "{log}");
}

#[test]
fn a_re_create_refused_while_the_watch_is_healthy_is_retried() {
    let mut bed = Bed::empty();
    bed.put(&format!("{PREFIX}/config"), DEFAULT_CONFIG);
    let grant = |bed: &Bed, perm: &str| {
        let out = bed.etcdctl(&[
            "role",
            "grant-permission",
            "flannel",
            "--prefix=true",
            perm,
            "/coreos.com/network/",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for args in [
        vec!["user", "add", "root:rootpw"],
        vec!["user", "add", "flannel:s3cret"],
        vec!["role", "add", "flannel"],
        vec!["user", "grant-role", "flannel", "flannel"],
    ] {
        let out = bed.etcdctl(&args);
        assert!(out.status.success(), "etcdctl {args:?}");
    }
    grant(&bed, "readwrite");
    assert!(bed.etcdctl(&["auth", "enable"]).status.success());
    bed.spec.ctl_args = vec!["--user=root:rootpw".into()];
    bed.add_host();
    let sn0 = bed.start_ready_with(0, &["--etcd-username=flannel", "--etcd-password=s3cret"]);
    // Writes refused from now on; reads (and the running watch) are fine.
    grant(&bed, "read");
    bed.del(&key_of(sn0));
    wait_for(
        "the re-create to be refused",
        Duration::from_secs(10),
        || {
            let log = bed.log(0);
            // ("re-creating lease … failed": the wording before the lease core.)
            (log.contains("etcd refuses us") || log.contains("re-creating lease")).then_some(())
        },
    );
    // Each refused attempt was granted an etcd lease before its write: none
    // is left behind (before: one per attempt, each living a day). Left:
    // the deleted key's own lease, and at most one attempt in flight.
    wait_for("three refused re-creates", Duration::from_secs(20), || {
        (bed.log(0).matches("etcd refuses us").count() >= 3).then_some(())
    });
    let listed = bed.etcdctl(&["lease", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    let leases = listed
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count();
    println!(
        "etcd leases after {} refused writes: {leases}",
        bed.log(0).matches("etcd refuses us").count()
    );
    assert!(leases <= 2, "{listed}");
    // Before, a failed re-create was retried only after a re-list, which a
    // healthy watch never needs: the lease stayed gone.
    grant(&bed, "readwrite");
    let t = Instant::now();
    let (_, v) = wait_for(
        "the lease to be re-created",
        Duration::from_secs(15),
        || bed.leases().into_iter().find(|(k, _)| *k == key_of(sn0)),
    );
    println!(
        "re-create retried: lease back {:?} after writes were allowed",
        t.elapsed()
    );
    assert!(v.contains(&format!("\"{}\"", bed.hosts[0].ip)), "{v}");
    assert!(bed.is_running(0), "{}", bed.log(0));
    assert_eq!(subnet_of(&bed, 0), Some(sn0));
}

#[test]
fn a_re_list_that_finds_our_key_held_by_another_host_moves_us() {
    let mut bed = Bed::new(1);
    let sn0 = bed.start_ready(0);
    // etcd away; the daemon frozen so that it resumes only after the
    // history it would resume from is compacted: it must re-list.
    bed.stop_etcd();
    wait_for("h0 to see the watch break", Duration::from_secs(15), || {
        bed.log(0).contains("lease watch broke").then_some(())
    });
    bed.signal(0, libc::SIGSTOP);
    bed.start_etcd();
    let other = Ipv4Addr::new(192, 168, 100, 77);
    bed.put(&key_of(sn0), &lease_value(other));
    bed.compact_now(5);
    let t = Instant::now();
    bed.signal(0, libc::SIGCONT);
    // Before, the re-list only checked that our key existed, so h0 kept
    // claiming a subnet another host held.
    let moved = wait_for("h0 to move", Duration::from_secs(20), || {
        subnet_of(&bed, 0).filter(|sn| *sn != sn0)
    });
    println!(
        "re-list found {sn0} held by {other}: moved to {moved} {:?} after resume",
        t.elapsed()
    );
    let leases = bed.leases();
    let v = &leases.iter().find(|(k, _)| *k == key_of(sn0)).unwrap().1;
    assert!(v.contains(&format!("\"{other}\"")), "{v}");
    let log = bed.log(0);
    assert!(log.contains("compacted away"), "{log}");
    assert!(
        log.contains(&format!("peer added subnet={sn0} public_ip={other}")),
        "{log}"
    );
}
