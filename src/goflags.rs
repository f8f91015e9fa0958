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
}
