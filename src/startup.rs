//! Checks of the command line made before flanneld touches anything (no
//! lease written, no device created): each error names the flag and the
//! environment variable that sets it. Pure; `main` applies them.

/// `--flag (FLANNELD_FLAG)`: how an error names a setting.
pub fn setting(flag: &str) -> String {
    format!(
        "--{flag} (FLANNELD_{})",
        flag.to_ascii_uppercase().replace('-', "_")
    )
}

/// Each etcd endpoint is an `http://` or `https://` URL with a host (a
/// malformed one would otherwise be retried forever).
pub fn check_endpoints(endpoints: &[String]) -> Result<(), String> {
    if endpoints.iter().all(|e| e.trim().is_empty()) {
        return Err(format!("{}: no endpoint given", setting("etcd-endpoints")));
    }
    for e in endpoints {
        let rest = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"));
        let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
        let ok = host.is_some_and(|h| {
            let (name, port) = match h.rsplit_once(':') {
                Some((n, p)) if !n.ends_with(']') || h.starts_with('[') => (n, Some(p)),
                _ => (h, None),
            };
            !name.is_empty()
                && !name.contains(char::is_whitespace)
                && !name.contains('@')
                && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
        });
        if !ok {
            return Err(format!(
                "{}: {e:?} is not an http:// or https:// URL with a host (e.g. http://10.0.0.1:2379)",
                setting("etcd-endpoints")
            ));
        }
    }
    Ok(())
}

/// Settings that only work together: both given or neither.
pub fn check_pair(a: (&str, bool), b: (&str, bool)) -> Result<(), String> {
    match (a.1, b.1) {
        (true, false) => Err(format!(
            "{} is given without {}: give both, or neither",
            setting(a.0),
            setting(b.0)
        )),
        (false, true) => Err(format!(
            "{} is given without {}: give both, or neither",
            setting(b.0),
            setting(a.0)
        )),
        _ => Ok(()),
    }
}

/// A device name the kernel takes: at most 15 bytes once `%d` becomes a
/// number (counted as one digit here: the kernel refuses what does not
/// fit), no `/`, no whitespace, at most one `%d` and no other `%`.
pub fn check_tun_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{}: {name:?} {why}", setting("tun-name")));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.matches("%d").count() > 1 || name.replace("%d", "").contains('%') {
        return bad("may hold one %d and no other %");
    }
    if name.contains('/') || name.contains(char::is_whitespace) || name == "." || name == ".." {
        return bad("is not a device name (no '/', no spaces)");
    }
    let len = name.replace("%d", "0").len();
    if len > 15 {
        return bad(&format!(
            "is {len} bytes long; a device name has at most 15"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let ok = |e: &[&str]| check_endpoints(&e.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(ok(&["http://127.0.0.1:2379", "https://etcd.example:2379/"]).is_ok());
        assert!(ok(&["http://[::1]:2379"]).is_ok());
        assert!(ok(&["http://etcd"]).is_ok());
        for bad in [
            "not-a-url",
            "127.0.0.1:2379",
            "http://",
            "http://:2379",
            "ftp://x:1",
            "http://h:99999",
            "http://h:x",
            "http://a b:1",
        ] {
            let e = ok(&["http://127.0.0.1:2379", bad]).unwrap_err();
            assert!(
                e.contains("--etcd-endpoints (FLANNELD_ETCD_ENDPOINTS)"),
                "{e}"
            );
            assert!(e.contains(bad), "{e}");
        }
        assert!(ok(&[""]).is_err());
    }

    #[test]
    fn pairs_and_names() {
        assert!(check_pair(("etcd-username", true), ("etcd-password", true)).is_ok());
        assert!(check_pair(("etcd-username", false), ("etcd-password", false)).is_ok());
        let e = check_pair(("etcd-username", false), ("etcd-password", true)).unwrap_err();
        assert!(e.starts_with("--etcd-password (FLANNELD_ETCD_PASSWORD) is given without --etcd-username (FLANNELD_ETCD_USERNAME)"), "{e}");
        for good in [
            "flannel%d",
            "flannel0",
            "flannel.1",
            "a234567890123%d",
            "a23456789012345",
        ] {
            assert!(check_tun_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a2345678901234567",
            "a23456789012345%d",
            "x%d%d",
            "x%s",
            "a/b",
            "a b",
            "..",
        ] {
            let e = check_tun_name(bad).unwrap_err();
            assert!(e.contains("--tun-name (FLANNELD_TUN_NAME)"), "{e}");
        }
    }
}
