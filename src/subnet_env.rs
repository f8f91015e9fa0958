//! `subnet.env`: what the CNI plugin and Docker read. Format and semantics
//! as flannel's `WriteSubnetFile`; written atomically (temp file + rename).
//! The one reader of the file's text too ([`vars`]): the daemon (its
//! previous subnet), the CNI plugin and `mk-docker-opts` all read it here.

use ipnetwork::Ipv4Network;
use std::net::Ipv4Addr;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Network,
    /// The leased subnet (network address form, e.g. 10.5.34.0/24).
    pub subnet: Ipv4Network,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// The file's text. `FLANNEL_SUBNET` is the subnet's first host address
    /// with the subnet length, e.g. `10.5.34.1/24`.
    pub fn render(&self) -> String {
        let first = Ipv4Addr::from(u32::from(self.subnet.network()).wrapping_add(1));
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            first,
            self.subnet.prefix(),
            self.mtu,
            self.ipmasq
        )
    }

    /// Writes the file atomically with mode 0644, creating parent dirs.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::atomic_file::write_atomic(path, self.render().as_bytes())
    }
}

/// The variables of a `subnet.env` as a shell would source them (no
/// expansion; `export`, comments and quotes handled).
pub fn vars(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("export ").unwrap_or(l);
            if l.starts_with('#') {
                return None;
            }
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

/// The subnet recorded by a previous run (`FLANNEL_SUBNET`), converted back
/// to network form; `None` if the text has no valid one.
pub fn previous_subnet(text: &str) -> Option<Ipv4Network> {
    let net: Ipv4Network = vars(text).get("FLANNEL_SUBNET")?.parse().ok()?;
    Ipv4Network::new(net.network(), net.prefix()).ok()
}

/// Reads [`previous_subnet`] from a file; a missing or unreadable file is `None`.
pub fn read_previous_subnet(path: &Path) -> Option<Ipv4Network> {
    previous_subnet(&std::fs::read_to_string(path).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> SubnetEnv {
        SubnetEnv {
            network: "10.5.0.0/16".parse().unwrap(),
            subnet: "10.5.34.0/24".parse().unwrap(),
            mtu: 1472,
            ipmasq: false,
        }
    }

    #[test]
    fn renders_flannel_format() {
        assert_eq!(
            env().render(),
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn previous_subnet_round_trips() {
        assert_eq!(previous_subnet(&env().render()), Some(env().subnet));
        assert_eq!(
            previous_subnet("FLANNEL_SUBNET=\"10.5.9.1/24\"\n"),
            Some("10.5.9.0/24".parse().unwrap())
        );
        assert_eq!(previous_subnet("FLANNEL_NETWORK=10.5.0.0/16\n"), None);
        assert_eq!(previous_subnet("FLANNEL_SUBNET=garbage\n"), None);
    }

    #[test]
    fn writes_atomically_with_parents() {
        let dir = std::env::temp_dir().join(format!("flannel-env-test-{}", std::process::id()));
        let path = dir.join("a/b/subnet.env");
        env().write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), env().render());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(read_previous_subnet(&path), Some(env().subnet));
        // No temp files left behind.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
