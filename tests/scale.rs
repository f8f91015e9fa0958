//! Scale: thousands of leases in a real etcd. The figures (start-up, route
//! table build, RSS, update lag, packet rate) are printed; the assertions
//! are about correctness and memory, not speed. The lease-count benchmark
//! is `FLANNEL_TEST_LOG=info cargo test --release --test scale -- --ignored --nocapture`.

mod support;

use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};
use support::*;

const CONFIG_8: &str = r#"{"Network":"10.0.0.0/8","Backend":{"Type":"udp"}}"#;

fn fake_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, (i >> 8) as u8, i as u8)
}

/// The "route table built" log line's fields.
fn build_line(log: &str) -> String {
    log.lines()
        .find(|l| l.contains("route table built"))
        .unwrap_or("")
        .to_string()
}

/// A bed with `n` leases and h0's daemon started; returns how long the
/// daemon took from exec to logging its built route table.
fn start_with_leases(n: usize) -> (Bed, Duration) {
    let mut bed = Bed::empty();
    bed.put(&format!("{PREFIX}/config"), CONFIG_8);
    bed.add_host();
    bed.add_host();
    bulk_leases(&bed, n, fake_ip);
    let t = Instant::now();
    bed.start_ready(0);
    let ready = wait_for("the route table", Duration::from_secs(30), || {
        (!build_line(&bed.log(0)).is_empty()).then_some(t.elapsed())
    });
    (bed, ready)
}

/// Packets h1 gets through h0's tunnel to a peer (a plain UDP socket on h1
/// playing the peer of a fake lease) while h0 sends for `secs`, and the rate.
fn packet_rate(bed: &Bed, secs: f64) -> (u64, f64) {
    let rx = in_ns(&bed.ns(1), || UdpSocket::bind("0.0.0.0:8285").unwrap());
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let counter = std::thread::spawn(move || {
        let mut n = 0u64;
        let mut buf = [0u8; 2048];
        while rx.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    });
    let t = Instant::now();
    in_ns(&bed.ns(0), move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("10.255.255.9:9").unwrap();
        let end = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < end {
            for _ in 0..64 {
                let _ = s.send(&[0u8; 64]);
            }
        }
    });
    let n = counter.join().unwrap();
    (n, n as f64 / (t.elapsed().as_secs_f64() - 0.3).max(0.1))
}

/// The PublicIPs named by "peer added"/"peer moved" lines, as whole tokens.
fn applied_public_ips(log: &str) -> std::collections::HashSet<String> {
    log.lines()
        .filter_map(|l| l.split("public_ip=").nth(1)?.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn five_thousand_leases_then_a_hundred_updates_a_second() {
    let (mut bed, startup) = start_with_leases(5000);
    let pid = bed.daemon_pid(0);
    let line = build_line(&bed.log(0));
    println!("5000 leases: ready in {startup:?}; {line}");
    assert!(line.contains("peers=5000"), "{line}");
    // A lease that routes to h1, where a plain socket counts what arrives.
    bed.put(
        &format!("{PREFIX}/subnets/10.255.255.0-24"),
        &format!(r#"{{"PublicIP":"{}","PublicIPv6":null}}"#, bed.hosts[1].ip),
    );
    wait_for("route to the counting peer", Duration::from_secs(5), || {
        bed.log(0).contains("10.255.255.0/24").then_some(())
    });
    let (idle_n, idle_rate) = packet_rate(&bed, 2.0);
    // 100 lease updates per second for 30 s (alternating PublicIPs of the
    // first 100 leases), while the data path forwards.
    let updates = std::thread::spawn({
        let ep = bed.endpoint.clone();
        let hub = bed.hub.clone();
        move || {
            in_ns(&hub, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mut c = etcd_client::Client::connect([ep], None).await.unwrap();
                    let start = tokio::time::Instant::now();
                    for k in 0..3000u32 {
                        tokio::time::sleep_until(start + Duration::from_millis(10 * k as u64))
                            .await;
                        let i = k % 100;
                        let net = Ipv4Addr::from(0x0a00_0000u32 + ((i + 1) << 8));
                        let ip = Ipv4Addr::new(172, 31, (k / 100) as u8, i as u8);
                        c.put(
                            format!("{PREFIX}/subnets/{net}-24"),
                            format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null}}"#),
                            None,
                        )
                        .await
                        .unwrap();
                    }
                    start.elapsed()
                })
            })
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let (busy_n, busy_rate) = packet_rate(&bed, 2.0);
    let took = updates.join().unwrap();
    let done = Instant::now();
    // The last round of updates (PublicIP 172.31.29.x) must all be applied.
    let lag = wait_for(
        "the last updates to be applied",
        Duration::from_secs(10),
        || {
            let ips = applied_public_ips(&bed.log(0));
            let applied = (0..100)
                .filter(|i| ips.contains(&format!("172.31.29.{i}")))
                .count();
            (applied == 100).then_some(done.elapsed())
        },
    );
    let rss = peak_rss_mb(pid);
    println!(
        "3000 updates in {took:?} (100/s): last applied {lag:?} after the last put; \
         data path {idle_rate:.0} pkt/s idle vs {busy_rate:.0} pkt/s during updates; peak RSS {rss:.1} MB"
    );
    assert!(rss < 40.0, "RSS {rss:.1} MB with 5000 leases");
    // The data path forwarded in both phases: the lease churn never left
    // it without a route table (not a speed floor: 100 of ~10^5 packets).
    assert!(
        idle_n >= 100,
        "only {idle_n} packets forwarded before the updates"
    );
    assert!(
        busy_n >= 100,
        "only {busy_n} packets forwarded during the updates"
    );
    assert!(bed.is_running(0));
    let _ = bed.stop(0, libc::SIGTERM);
}

/// Start-up and memory against lease count: a benchmark, run by hand.
#[test]
#[ignore]
fn scale_benchmark() {
    println!("| leases | ready after start | route table build | peak RSS MB |");
    println!("|---|---|---|---|");
    for n in [100usize, 1_000, 5_000, 20_000] {
        let (bed, startup) = start_with_leases(n);
        let line = build_line(&bed.log(0));
        let build = line
            .split("build=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("?");
        println!(
            "| {n} | {startup:?} | {build} | {:.1} |",
            peak_rss_mb(bed.daemon_pid(0))
        );
    }
}
