//! Secured and clustered etcd: TLS with client certificates, user/password
//! auth, and a 3-member cluster losing the member the daemon talks to.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

fn tls_bed(expired_client: bool) -> Bed {
    let dir = std::env::temp_dir().join(format!(
        "flannel-certs-{}-{}",
        std::process::id(),
        expired_client
    ));
    make_certs(&dir, expired_client);
    let bed = Bed::with_etcd(EtcdSpec {
        members: 1,
        tls: Some(dir),
        ..EtcdSpec::default()
    });
    bed.put(&format!("{PREFIX}/config"), DEFAULT_CONFIG);
    bed
}

/// Runs flanneld on host 0 with `args` (and the bed's endpoints) until it
/// exits or 30 s pass; returns (exit status or None when it kept running, stderr).
fn run_briefly(bed: &Bed, args: &[String]) -> (Option<std::process::ExitStatus>, String, Duration) {
    let h = &bed.hosts[0];
    let err = bed.dir.join("brief.err");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &h.ns])
        .arg(flanneld_bin())
        .arg(format!("--etcd-endpoints={}", bed.endpoint))
        .arg(format!("--subnet-file={}", h.subnet_file.display()))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status,
        std::fs::read_to_string(&err).unwrap_or_default(),
        t.elapsed(),
    )
}

#[test]
fn tls_with_client_certificates_works_and_bad_certificates_fail_fast() {
    let mut bed = tls_bed(false);
    bed.add_host();
    bed.add_host();
    bed.start_ready(1);
    let tls = bed.spec.tls.clone().unwrap();
    let f = |n: &str| tls.join(n).to_string_lossy().into_owned();
    // Good certificates: lease acquired and stored.
    assert_eq!(bed.leases().len(), 1);
    // A CA that did not sign the server certificate.
    let other = bed.dir.join("other-ca");
    make_certs(&other, false);
    let (status, err, took) = run_briefly(
        &bed,
        &[
            format!("--etcd-cafile={}", other.join("ca.pem").display()),
            format!("--etcd-certfile={}", f("client.pem")),
            format!("--etcd-keyfile={}", f("client.key")),
        ],
    );
    println!(
        "wrong CA: exit {status:?} after {took:?}: {}",
        err.lines().last().unwrap_or("")
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "wrong CA must fail, not hang: {err}"
    );
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("TLS") || err.contains("tls"),
        "{err}"
    );
    assert_eq!(bed.leases().len(), 1, "failed starts must not write leases");
}

#[test]
fn an_expired_client_certificate_is_a_clear_error() {
    let mut bed = tls_bed(true);
    bed.add_host();
    let tls = bed.spec.tls.clone().unwrap();
    let f = |n: &str| tls.join(n).to_string_lossy().into_owned();
    let (status, err, took) = run_briefly(
        &bed,
        &[
            format!("--etcd-cafile={}", f("ca.pem")),
            format!("--etcd-certfile={}", f("client.pem")),
            format!("--etcd-keyfile={}", f("client.key")),
        ],
    );
    println!(
        "expired client cert: exit {status:?} after {took:?}: {}",
        err.lines().last().unwrap_or("")
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "expired cert must fail, not hang: {err}"
    );
    // The message names the file and the expiry, not just "no connection".
    assert!(
        err.contains(&format!(
            "--etcd-certfile (FLANNELD_ETCD_CERTFILE) {} is not valid now",
            f("client.pem")
        )),
        "{err}"
    );
    assert!(err.contains("valid from") && err.contains(" to "), "{err}");
}

/// Enables etcd auth with a `flannel` user allowed the network prefix.
fn enable_auth(bed: &mut Bed) {
    for args in [
        vec!["user", "add", "root:rootpw"],
        vec!["user", "add", "flannel:s3cret"],
        vec!["role", "add", "flannel"],
        vec![
            "role",
            "grant-permission",
            "flannel",
            "--prefix=true",
            "readwrite",
            "/coreos.com/network/",
        ],
        vec!["user", "grant-role", "flannel", "flannel"],
        vec!["auth", "enable"],
    ] {
        let out = bed.etcdctl(&args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    bed.spec.ctl_args = vec!["--user=root:rootpw".into()];
}

#[test]
fn username_and_password_auth() {
    let mut bed = Bed::empty();
    bed.put(&format!("{PREFIX}/config"), DEFAULT_CONFIG);
    enable_auth(&mut bed);
    bed.add_host();
    bed.add_host();
    let (status, err, took) = run_briefly(
        &bed,
        &[
            "--etcd-username=flannel".into(),
            "--etcd-password=wrong".into(),
        ],
    );
    println!(
        "wrong password: exit {status:?} after {took:?}: {}",
        err.lines().last().unwrap_or("")
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "wrong password must fail, not hang: {err}"
    );
    assert!(
        err.contains("authentication") || err.contains("password"),
        "{err}"
    );
    bed.start(1, &["--etcd-username=flannel", "--etcd-password=s3cret"]);
    bed.wait_subnet(1);
    assert_eq!(bed.leases().len(), 1);
}

#[test]
fn losing_the_etcd_member_in_use_does_not_interrupt_the_daemon() {
    let mut bed = Bed::with_etcd(EtcdSpec {
        members: 3,
        ..EtcdSpec::default()
    });
    bed.put(&format!("{PREFIX}/config"), DEFAULT_CONFIG);
    for _ in 0..5 {
        bed.add_host();
    }
    bed.start_ready(0);
    bed.start_ready(1);
    let dst = bed.tun_addr(1);
    wait_for("h0 -> h1", Duration::from_secs(10), || {
        bed.ping(0, dst).then_some(())
    });
    // Kill each member in turn (quorum stays: one down at a time); each
    // time a new host must get a lease and be routed by h0.
    for m in 0..3 {
        bed.kill_member(m);
        let t = Instant::now();
        assert!(bed.ping(0, dst), "traffic interrupted when member {m} died");
        let sn = bed.start_ready(2 + m);
        let healed = wait_for(
            &format!("h0 to route h{} with member {m} down", 2 + m),
            Duration::from_secs(20),
            || bed.ping(0, sn.network()).then_some(t.elapsed()),
        );
        println!("etcd member {m} killed: new host routed {healed:?} later");
        bed.start_member(m);
        wait_for("member back", Duration::from_secs(20), || {
            bed.etcdctl(&["endpoint", "health", "--cluster"])
                .status
                .success()
                .then_some(())
        });
    }
    assert!(bed.is_running(0) && bed.is_running(1));
}

#[test]
fn expired_auth_tokens_are_refreshed_and_a_password_start_survives_etcd_being_down() {
    // Tokens live 3 s (etcd extends a token each time it is used): with
    // an 8 s lease, renewed every ~4 s, each renewal finds its token
    // expired.
    let mut bed = Bed::with_etcd(EtcdSpec {
        members: 1,
        etcd_args: vec!["--auth-token-ttl=3".into()],
        ..EtcdSpec::default()
    });
    bed.put(&format!("{PREFIX}/config"), DEFAULT_CONFIG);
    enable_auth(&mut bed);
    bed.add_host();
    bed.add_host();
    const P: u16 = 9141;
    let creds = ["--etcd-username=flannel", "--etcd-password=s3cret"];
    let sn0 = bed.start_ready_with(
        0,
        &[
            creds[0],
            creds[1],
            "--subnet-lease-ttl=8",
            &format!("--healthz-port={P}"),
        ],
    );
    std::thread::sleep(Duration::from_secs(14));
    let m = http_get(&bed.ns(0), P, "/metrics").unwrap().1;
    let renewals = metric(&m, "flannel_lease_renewals_total");
    assert!(
        renewals >= 2,
        "{renewals} renewals in 14 s:\n{}",
        bed.log(0)
    );
    assert!(bed.lease_id(&key_of(sn0)).is_some_and(|id| id > 0));
    let log = bed.log(0);
    assert!(!log.contains("refuses us"), "{log}");
    // The watch still works on a fresh token: a new host is routed.
    bed.start(1, &creds);
    bed.wait_subnet(1);
    let dst = bed.tun_addr(1);
    wait_for("h0 -> h1", Duration::from_secs(10), || {
        bed.ping(0, dst).then_some(())
    });
    // etcd down at start: a password start waits instead of exiting, and
    // comes up when etcd does.
    bed.stop(1, libc::SIGTERM);
    bed.stop_etcd();
    let _ = std::fs::remove_file(&bed.hosts[1].subnet_file);
    let _ = std::fs::remove_file(
        bed.hosts[1]
            .subnet_file
            .with_file_name("subnet.env.peers.json"),
    );
    bed.start(1, &creds);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        bed.is_running(1),
        "flanneld exited with etcd down:\n{}",
        bed.log(1)
    );
    bed.start_etcd();
    bed.wait_subnet(1);
}

#[test]
fn a_key_file_without_a_certificate_is_refused_not_ignored() {
    let mut bed = Bed::empty();
    bed.put(&format!("{PREFIX}/config"), DEFAULT_CONFIG);
    bed.add_host();
    let key = bed.dir.join("client.key");
    std::fs::write(&key, "not used").unwrap();
    let (status, err, _) = run_briefly(&bed, &[format!("--etcd-keyfile={}", key.display())]);
    assert!(
        status.is_some_and(|s| !s.success()),
        "a lone key file must fail: {err}"
    );
    assert!(
        err.contains("--etcd-keyfile (FLANNELD_ETCD_KEYFILE) is given without --etcd-certfile"),
        "{err}"
    );
    assert!(bed.leases().is_empty(), "it went on in plaintext");
}
