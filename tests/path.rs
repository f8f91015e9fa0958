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
            .args(["60", "ip", "netns", "exec", &bed.ns(from), "iperf3", "-c", &dst, "-p", "5301", "-n", bytes, "-f", "g"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
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
    metric(&m, &format!(r#"flannel_dropped_packets_total{{direction="{dir}",reason="{reason}"}}"#))
}

#[test]
fn small_tcp_segments_are_carried_in_both_modes() {
    let _heavy = heavy();
    let port = format!("--healthz-port={PORT}");
    for mode in MODES {
        let mut bed = Bed::new(2);
        bed.start_ready_with(0, &[mode, &port]);
        bed.start_ready_with(1, &[mode, &port]);
        let dst = bed.tun_addr(1);
        wait_for("h0 -> h1", Duration::from_secs(10), || bed.ping(0, dst).then_some(()));
        for mss in ["88", "200", "536"] {
            let t = Instant::now();
            let (ok, gbit, out) = iperf(&bed, 0, 1, "8M", &["-M", mss]);
            assert!(ok, "{mode} -M {mss}: iperf3 failed:\n{out}");
            println!("{mode} MSS {mss}: 8 MB in {:?} ({gbit} Gbit/s)", t.elapsed());
            for i in 0..2 {
                for dir in ["egress", "ingress"] {
                    for reason in ["malformed", "send_error", "tun_write_error"] {
                        assert_eq!(drops(&bed, i, dir, reason), 0, "{mode} -M {mss}: h{i} {dir} {reason}");
                    }
                }
            }
        }
        for i in 0..2 {
            assert!(bed.is_running(i), "{mode}: h{i} died");
        }
    }
}
