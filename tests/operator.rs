//! What an operator meets at start: bad settings refused before anything
//! is touched, each error naming the flag and its FLANNELD_* variable; Go
//! flanneld's flags accepted when harmless and refused with a way out
//! otherwise; empty FLANNELD_* values skipped; a fatal error logged once,
//! in the log's format; `-v` scoped to our crates; one start-up line.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// Runs flanneld on h0 with `args` and `env` until it exits (30 s at most):
/// its exit code and stderr.
fn run(bed: &Bed, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let h = &bed.hosts[0];
    let err = bed.dir.join("op.err");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &h.ns])
        .arg(flanneld_bin())
        .arg(format!("--etcd-endpoints={}", bed.endpoint))
        .arg(format!("--subnet-file={}", h.subnet_file.display()))
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let t = Instant::now();
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, std::fs::read_to_string(&err).unwrap_or_default())
}

/// Flags, environment, and what the error must say.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn bad_settings_are_refused_before_anything_is_touched() {
    let bed = Bed::new(1);
    let cases: &[Case] = &[
        (&["--etcd-endpoints=not-a-url"], &[], "--etcd-endpoints (FLANNELD_ETCD_ENDPOINTS): \"not-a-url\""),
        (&["--etcd-username=flannel"], &[], "--etcd-username (FLANNELD_ETCD_USERNAME) is given without --etcd-password (FLANNELD_ETCD_PASSWORD)"),
        (&[], &[("FLANNELD_ETCD_PASSWORD", "s3cret")], "--etcd-password (FLANNELD_ETCD_PASSWORD) is given without --etcd-username"),
        (&["--tun-name=flannel-overlay-0"], &[], "--tun-name (FLANNELD_TUN_NAME): \"flannel-overlay-0\" is 17 bytes long"),
        (&["--kube-subnet-mgr"], &[], "Kubernetes subnet manager is not implemented: run flanneld with etcd (--etcd-endpoints)"),
        (&["--net-config-path=/etc/kube-flannel/net-conf.json"], &[], "put the file's JSON at <prefix>/config"),
        (&[], &[("FLANNELD_IPTABLES_RESYNC", "soon")], "--iptables-resync or the environment variable FLANNELD_IPTABLES_RESYNC"),
    ];
    for (args, env, want) in cases {
        let (code, err) = run(&bed, args, env);
        assert!(
            matches!(code, Some(1 | 2)),
            "{args:?} {env:?}: exit {code:?}\n{err}"
        );
        assert!(
            err.contains(want),
            "{args:?} {env:?}: wanted {want:?} in\n{err}"
        );
        assert!(bed.leases().is_empty(), "{args:?}: a lease was written");
        assert!(
            !sh(&["ip", "-n", &bed.ns(0), "link"]).contains("flannel"),
            "{args:?}: a device was made"
        );
    }
    // A fatal error is logged once, and as JSON in --log-format json.
    let (code, err) = run(&bed, &["--log-format=json", "--etcd-username=flannel"], &[]);
    assert_eq!(code, Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    for l in &lines {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
    }
    assert_eq!(err.matches("is given without").count(), 1, "{err}");
}

#[test]
fn empty_env_values_are_skipped_go_logging_flags_accepted_and_v_scoped_to_ours() {
    let bed = Bed::new(1);
    let h = &bed.hosts[0];
    let log = bed.dir.join("start.log");
    let mut cmd = bed.flanneld_cmd(0, &["--logtostderr", "--v=2", "--vmodule", "x=1"]);
    cmd.env_remove("RUST_LOG")
        .env("FLANNELD_PUBLIC_IP", "")
        .env("FLANNELD_IFACE", "")
        .env("FLANNELD_HEALTHZ_PORT", "");
    let (mut child, sn) = spawn_until_lease(&mut cmd, &log, &h.subnet_file.clone(), "a lease");
    let text = wait_for("the start-up line", Duration::from_secs(10), || {
        let t = std::fs::read_to_string(&log).unwrap();
        t.contains("flanneld started").then_some(t)
    });
    assert!(term_child(&mut child), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("flanneld started"))
        .unwrap();
    for want in [
        format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
        "backend=\"udp\"".to_string(),
        format!("subnet={sn}"),
        "mtu=1472".to_string(),
        "iface=eth0".to_string(),
        "config=\"etcd\"".to_string(),
    ] {
        assert!(line.contains(&want), "{want} in {line}");
    }
    assert!(
        text.contains("--logtostderr is Go flanneld's logging flag; ignored"),
        "{text}"
    );
    assert!(
        text.contains("--vmodule is Go flanneld's logging flag; ignored"),
        "{text}"
    );
    // -v 2: our debug lines, none of the libraries'.
    assert!(text.contains("DEBUG"), "{text}");
    for l in text.lines().filter(|l| l.contains("DEBUG")) {
        assert!(
            !["h2", "tonic", "tower", "hyper"]
                .iter()
                .any(|c| l.contains(&format!(" {c}::")) || l.contains(&format!("{c}::"))),
            "a library's debug line: {l}"
        );
    }
}
