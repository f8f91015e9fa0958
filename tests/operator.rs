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

/// `flanneld status` shows the running daemon's lease, its expiry, the
/// peers and the last etcd answer; /metrics has the build and the expiry.
#[test]
fn status_shows_the_lease_its_expiry_and_the_peers() {
    const PORT: u16 = 9141;
    let mut bed = Bed::new(2);
    let sn0 = bed.start_ready_with(0, &[&format!("--healthz-port={PORT}")]);
    let sn1 = bed.start_ready(1);
    let ns0 = bed.ns(0);
    let status = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns0])
            .arg(flanneld_bin())
            .arg("status")
            .args(args)
            .env_remove("FLANNELD_HEALTHZ_PORT")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let port = format!("--healthz-port={PORT}");
    let text = wait_for("h1 in h0's status", Duration::from_secs(10), || {
        let (code, out, _) = status(&[&port]);
        (code == Some(0) && out.contains(&sn1.to_string())).then_some(out)
    });
    assert!(
        text.starts_with("flanneld ") && text.contains(": ready"),
        "{text}"
    );
    assert!(
        text.contains(&format!("subnet    {sn0} on flannel")),
        "{text}"
    );
    assert!(
        text.contains("lease     expires in 23 h")
            || text.contains("lease     expires in 24 h 0 min"),
        "{text}"
    );
    assert!(text.contains("etcd      last answer"), "{text}");
    assert!(
        text.contains(&format!("  {sn1} via {}", bed.hosts[1].ip)),
        "{text}"
    );
    let (_, json, _) = status(&[&port, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["subnet"], sn0.to_string());
    assert_eq!(v["backend"], "udp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expires = v["lease_expires"].as_u64().unwrap();
    assert!(
        expires > now + 86_000 && expires <= now + 86_400,
        "{expires} vs {now}"
    );
    let scrape = http_get(&ns0, PORT, "/metrics").unwrap().1;
    assert!(
        scrape.contains(&format!(
            "flannel_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{scrape}"
    );
    assert_eq!(
        metric(&scrape, "flannel_lease_expiry_timestamp_seconds"),
        expires
    );
    // Nothing listening: exit 2 with a hint.
    let (code, _, err) = status(&["--healthz-port=9142"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("is it running with --healthz-port=9142"),
        "{err}"
    );
}

/// The shipped unit and env file, run as systemd would: the env file's
/// assignments (an empty one included) and `ExecStart`'s `$FLANNEL_OPTIONS`
/// split on spaces. The file ships no active placeholder (a TLS path that
/// does not exist would stop the start), and Go-style flags in
/// FLANNEL_OPTIONS work.
#[test]
fn the_shipped_unit_and_env_file_start_the_daemon() {
    let root = env!("CARGO_MANIFEST_DIR");
    let unit = std::fs::read_to_string(format!("{root}/dist/flanneld.service")).unwrap();
    let before = unit
        .lines()
        .find_map(|l| l.strip_prefix("Before="))
        .unwrap();
    assert!(
        before.split_whitespace().any(|u| u == "kubelet.service"),
        "{before}"
    );
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    assert!(exec.ends_with(" $FLANNEL_OPTIONS"), "{exec}");
    let envfile = std::fs::read_to_string(format!("{root}/dist/flanneld.default")).unwrap();
    let vars: Vec<(String, String)> = envfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    assert!(
        !vars
            .iter()
            .any(|(k, _)| k.contains("FILE") && k != "FLANNELD_SUBNET_FILE"),
        "active TLS paths: {vars:?}"
    );
    let bed = Bed::new(1);
    let h = &bed.hosts[0];
    let options = format!(
        "-etcd-endpoints={} -subnet-file={} -iface eth0 --healthz-port=9143",
        bed.endpoint,
        h.subnet_file.display()
    );
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &h.ns])
        .arg(flanneld_bin())
        .env_remove("RUST_LOG");
    for (k, v) in &vars {
        cmd.env(k, v);
    }
    cmd.env("FLANNEL_OPTIONS", &options);
    // systemd: an unquoted $VAR becomes one argument per word.
    cmd.args(options.split_whitespace());
    let log = bed.dir.join("unit.log");
    let (mut child, _) = spawn_until_lease(&mut cmd, &log, &h.subnet_file.clone(), "a lease");
    wait_for("ready", Duration::from_secs(10), || {
        (http_get(&bed.ns(0), 9143, "/readyz").map(|r| r.0) == Some(200)).then_some(())
    });
    assert!(
        term_child(&mut child),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
}
