//! Go flanneld's command-line conventions, so an operator's existing flags
//! and environment files keep working: Go's `flag` package takes long flags
//! with one dash (`-etcd-endpoints=…`, `-iface eth0`) as well as two, and
//! booleans in `strconv.ParseBool`'s spellings. Pure functions; `main`
//! applies them before clap parses.

use std::ffi::OsString;

/// Rewrites Go-style single-dash long flags (`-etcd-prefix=/x`,
/// `-iface eth0`) into the `--` form; single-letter flags (`-v 2`, `-h`,
/// `-V`), values, and everything after `--` are left alone.
pub fn normalize<I: IntoIterator<Item = OsString>>(args: I) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut rest = false;
    for (i, a) in args.into_iter().enumerate() {
        if i == 0 || rest {
            out.push(a);
            continue;
        }
        let Some(s) = a.to_str() else {
            out.push(a);
            continue;
        };
        if s == "--" {
            rest = true;
            out.push(a);
            continue;
        }
        let name = s.strip_prefix('-').filter(|n| !n.starts_with('-'));
        let long = name.is_some_and(|n| {
            let n = n.split('=').next().unwrap_or("");
            n.len() > 1 && n.starts_with(|c: char| c.is_ascii_alphabetic())
        });
        out.push(if long { format!("-{s}").into() } else { a });
    }
    out
}

/// Go flanneld's logging flags (klog's): harmless here, accepted and
/// ignored. `true`: the flag takes a value (`--vmodule x` or `=x`).
const IGNORED: &[(&str, bool)] = &[
    ("logtostderr", false),
    ("alsologtostderr", false),
    ("stderrthreshold", true),
    ("vmodule", true),
    ("log_backtrace_at", true),
    ("log_dir", true),
    ("log_file", true),
    ("add_dir_header", false),
    ("skip_headers", false),
];

/// Go flanneld's flags for what this flanneld does not do, and what to
/// use instead.
const REFUSED: &[(&str, &str)] = &[
    ("kube-subnet-mgr", "the Kubernetes subnet manager is not implemented: run flanneld with etcd (--etcd-endpoints)"),
    ("kube-api-url", "the Kubernetes subnet manager is not implemented: run flanneld with etcd (--etcd-endpoints)"),
    ("kubeconfig-file", "the Kubernetes subnet manager is not implemented: run flanneld with etcd (--etcd-endpoints)"),
    ("kube-annotation-prefix", "the Kubernetes subnet manager is not implemented: run flanneld with etcd (--etcd-endpoints)"),
    ("set-node-network-unavailable", "it only acts with the Kubernetes subnet manager, which is not implemented: run flanneld with etcd (--etcd-endpoints)"),
    ("net-config-path", "the network config is read from etcd: put the file's JSON at <prefix>/config (etcdctl put /coreos.com/network/config \"$(cat net-conf.json)\")"),
    ("ip-blackhole-route", "it is not implemented: add the route yourself (ip route add blackhole <subnet>)"),
    ("public-ipv6", "IPv6 is not supported: flanneld carries IPv4 only"),
    ("iface-v6", "IPv6 is not supported: flanneld carries IPv4 only"),
    ("auto-detect-ipv6", "IPv6 is not supported: flanneld carries IPv4 only"),
];

/// Takes Go flanneld's flags out of `args` (after [`normalize`]): the
/// harmless ones are dropped and named in the second list (to warn about),
/// one we cannot honour is an error that says what to use instead.
pub fn strip_go_only(args: Vec<OsString>) -> Result<(Vec<OsString>, Vec<String>), String> {
    let mut out = Vec::with_capacity(args.len());
    let mut ignored = Vec::new();
    let mut it = args.into_iter();
    let mut rest = false;
    while let Some(a) = it.next() {
        let Some(s) = a.to_str().filter(|_| !rest) else {
            out.push(a);
            continue;
        };
        if s == "--" {
            rest = true;
            out.push(a);
            continue;
        }
        let Some(flag) = s.strip_prefix("--") else {
            out.push(a);
            continue;
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, _)) => (n, true),
            None => (flag, false),
        };
        if let Some(&(_, why)) = REFUSED.iter().find(|(n, _)| *n == name) {
            return Err(format!("--{name} (Go flanneld's) is not supported: {why}"));
        }
        if let Some(&(_, takes)) = IGNORED.iter().find(|(n, _)| *n == name) {
            if takes && !value {
                it.next();
            }
            ignored.push(name.to_string());
            continue;
        }
        out.push(a);
    }
    Ok((out, ignored))
}

/// A boolean as Go's `strconv.ParseBool` reads it: 1, t, T, TRUE, true,
/// True, 0, f, F, FALSE, false, False.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!(
            "{s:?} is not a boolean (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False)"
        )),
    }
}

/// The `FLANNELD_*` variables in `env` that name no setting we know, sorted.
pub fn unknown_env(env: impl IntoIterator<Item = (String, String)>, known: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = env
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("FLANNELD_") && !known.contains(&k.as_str()))
        .collect();
    v.sort();
    v
}

/// A Go `time.Duration` string with one unit (`50us`, `1ms`, `2s`; `0`
/// alone): for the latency knobs, where microseconds matter.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let at = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit (use ns, us, ms or s)"))?;
    let (n, unit) = s.split_at(at);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number with a unit"))?;
    let ns = match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ns, us, ms or s)"
            ))
        }
    };
    n.checked_mul(ns)
        .map(std::time::Duration::from_nanos)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_go_units() {
        use std::time::Duration;
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("50us"), Ok(Duration::from_micros(50)));
        assert_eq!(parse_duration("2ms"), Ok(Duration::from_millis(2)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_duration("50").unwrap_err().contains("no unit"));
        assert!(parse_duration("5h").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("x5us").is_err());
    }

    fn norm(a: &[&str]) -> Vec<String> {
        normalize(a.iter().map(OsString::from))
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn go_single_dash_long_flags_become_double_dash() {
        assert_eq!(
            norm(&[
                "flanneld",
                "-etcd-endpoints=http://a:2379",
                "-iface",
                "eth0",
                "--ip-masq"
            ]),
            [
                "flanneld",
                "--etcd-endpoints=http://a:2379",
                "--iface",
                "eth0",
                "--ip-masq"
            ]
        );
        // Short flags, values that look like flags after `--`, and plain
        // values stay as they are.
        assert_eq!(
            norm(&["flanneld", "-v", "2", "-v=3", "-h"]),
            ["flanneld", "-v", "2", "-v=3", "-h"]
        );
        assert_eq!(
            norm(&["flanneld", "--", "-iface"]),
            ["flanneld", "--", "-iface"]
        );
        assert_eq!(
            norm(&["flanneld", "-ip-masq=T"]),
            ["flanneld", "--ip-masq=T"]
        );
        assert_eq!(norm(&["flanneld", "-5"]), ["flanneld", "-5"]);
    }

    #[test]
    fn booleans_in_go_spellings() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_bool(t), Ok(true), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_bool(f), Ok(false), "{f}");
        }
        for bad in ["yes", "on", "tRUE", "", "2"] {
            assert!(parse_bool(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_flanneld_variables_are_named() {
        let env = [
            ("FLANNELD_IFACE", "eth0"),
            ("FLANNELD_KUBE_SUBNET_MGR", "true"),
            ("PATH", "/bin"),
            ("FLANNELD_A", "x"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(
            unknown_env(env, &["FLANNELD_IFACE"]),
            ["FLANNELD_A", "FLANNELD_KUBE_SUBNET_MGR"]
        );
    }

    #[test]
    fn go_only_flags_are_dropped_or_refused_with_a_way_out() {
        let v = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let (args, ignored) = strip_go_only(v(&[
            "flanneld",
            "--logtostderr",
            "--v=2",
            "--vmodule",
            "x=3",
            "--stderrthreshold=INFO",
            "--iface",
            "eth0",
            "--",
            "--logtostderr",
        ]))
        .unwrap();
        assert_eq!(
            args,
            v(&[
                "flanneld",
                "--v=2",
                "--iface",
                "eth0",
                "--",
                "--logtostderr"
            ])
        );
        assert_eq!(ignored, ["logtostderr", "vmodule", "stderrthreshold"]);
        let e = strip_go_only(v(&["flanneld", "--kube-subnet-mgr"])).unwrap_err();
        assert!(e.contains("--etcd-endpoints"), "{e}");
        let e = strip_go_only(v(&[
            "flanneld",
            "--net-config-path=/etc/kube-flannel/net-conf.json",
        ]))
        .unwrap_err();
        assert!(e.contains("<prefix>/config"), "{e}");
    }
}
