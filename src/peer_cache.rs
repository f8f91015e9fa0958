//! What the node knew, kept beside subnet.env so a restart while etcd is
//! unreachable can forward at once: the network config, our subnet and
//! PublicIP, and the peer table. Rewritten atomically whenever the peers
//! change; read only at start, and only trusted when it matches subnet.env
//! and our PublicIP. etcd stays the truth: the keeper reconciles with it
//! as soon as it answers.

use crate::backend::Peer;
use crate::wire::ether::Mac;
use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCache {
    /// The `<prefix>/config` text the lease was taken under.
    pub config: String,
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    pub peers: Vec<(Ipv4Network, Peer)>,
    /// Our VtepMAC (vxlan backend), kept so a restart keeps it.
    pub vtep_mac: Option<Mac>,
}

/// The cache file of a subnet file: `subnet.env` → `subnet.env.peers.json`.
pub fn path_for(subnet_file: &Path) -> PathBuf {
    let mut name = subnet_file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".peers.json");
    subnet_file.with_file_name(name)
}

/// The file's JSON: addresses and subnets as text (`10.5.3.0/24`).
#[derive(Serialize, Deserialize)]
struct Wire {
    config: String,
    subnet: String,
    public_ip: Ipv4Addr,
    peers: Vec<(String, Ipv4Addr)>,
    /// Peers' VtepMACs by subnet (absent in caches of the udp backend).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    peer_macs: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vtep_mac: Option<String>,
    /// Peers' WireGuard public keys and ports by subnet (wireguard backend).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    peer_keys: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    peer_ports: std::collections::BTreeMap<String, u16>,
}

impl PeerCache {
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let w = Wire {
            config: self.config.clone(),
            subnet: self.subnet.to_string(),
            public_ip: self.public_ip,
            peers: self
                .peers
                .iter()
                .map(|(sn, p)| (sn.to_string(), p.ip))
                .collect(),
            peer_macs: self
                .peers
                .iter()
                .filter_map(|(sn, p)| Some((sn.to_string(), p.mac?.to_string())))
                .collect(),
            vtep_mac: self.vtep_mac.map(|m| m.to_string()),
            peer_keys: self
                .peers
                .iter()
                .filter_map(|(sn, p)| {
                    Some((sn.to_string(), crate::wireguard::key_to_base64(&p.key?)))
                })
                .collect(),
            peer_ports: self
                .peers
                .iter()
                .filter_map(|(sn, p)| Some((sn.to_string(), p.port?)))
                .collect(),
        };
        let json = serde_json::to_vec(&w).map_err(std::io::Error::other)?;
        crate::atomic_file::write_atomic(path, &json)
    }

    fn parse(text: &[u8]) -> Result<PeerCache, String> {
        let w: Wire = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        let net = |s: &str| s.parse::<Ipv4Network>().map_err(|e| format!("{s:?}: {e}"));
        let mac = |s: &String| s.parse::<Mac>().map_err(|e| e.to_string());
        Ok(PeerCache {
            config: w.config,
            subnet: net(&w.subnet)?,
            public_ip: w.public_ip,
            peers: w
                .peers
                .iter()
                .map(|(sn, ip)| {
                    let m = w.peer_macs.get(sn).map(mac).transpose()?;
                    let key = w
                        .peer_keys
                        .get(sn)
                        .map(|k| {
                            crate::wireguard::key_from_base64(k)
                                .map_err(|e| format!("key of {sn} {e}"))
                        })
                        .transpose()?;
                    let port = w.peer_ports.get(sn).copied();
                    Ok((
                        net(sn)?,
                        Peer {
                            mac: m,
                            key,
                            port,
                            ..Peer::from(*ip)
                        },
                    ))
                })
                .collect::<Result<_, String>>()?,
            vtep_mac: w.vtep_mac.as_ref().map(mac).transpose()?,
        })
    }

    /// Our VtepMAC as the cache at `path` remembers it, whatever lease it
    /// was written for.
    pub fn vtep_mac(path: &Path) -> Option<Mac> {
        let text = std::fs::read(path).ok()?;
        PeerCache::parse(&text).ok()?.vtep_mac
    }

    /// The cache, if it is there, readable, and written for `public_ip`
    /// holding `leased` (the subnet subnet.env names); `None` (with the
    /// reason logged) otherwise.
    pub fn load(
        path: &Path,
        leased: Option<Ipv4Network>,
        public_ip: Ipv4Addr,
    ) -> Option<PeerCache> {
        let text = std::fs::read(path).ok()?;
        let cache = match PeerCache::parse(&text) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("ignoring the peer cache {}: {e}", path.display());
                return None;
            }
        };
        if leased != Some(cache.subnet) || cache.public_ip != public_ip {
            tracing::info!(
                "the peer cache {} is for another lease ({} of {}); ignored",
                path.display(),
                cache.subnet,
                cache.public_ip
            );
            return None;
        }
        Some(cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet_env::SubnetEnv;

    #[test]
    fn a_cache_round_trips_and_is_trusted_only_for_its_lease() {
        let dir = std::env::temp_dir().join(format!("peer-cache-{}", std::process::id()));
        let env = dir.join("subnet.env");
        let path = path_for(&env);
        assert_eq!(path, dir.join("subnet.env.peers.json"));
        let me = Ipv4Addr::new(192, 168, 0, 1);
        let c = PeerCache {
            config: r#"{"Network":"10.5.0.0/16"}"#.into(),
            subnet: "10.5.3.0/24".parse().unwrap(),
            public_ip: me,
            peers: vec![
                (
                    "10.5.4.0/24".parse().unwrap(),
                    Ipv4Addr::new(192, 168, 0, 2).into(),
                ),
                (
                    "10.5.5.0/24".parse().unwrap(),
                    Peer {
                        mac: Some(Mac([2, 0, 0, 0, 0, 3])),
                        ..Ipv4Addr::new(192, 168, 0, 3).into()
                    },
                ),
                (
                    "10.5.6.0/24".parse().unwrap(),
                    Peer {
                        key: Some([9; 32]),
                        port: Some(51999),
                        ..Ipv4Addr::new(192, 168, 0, 4).into()
                    },
                ),
            ],
            vtep_mac: Some(Mac([2, 0, 0, 0, 0, 1])),
        };
        c.write(&path).unwrap();
        assert_eq!(PeerCache::vtep_mac(&path), c.vtep_mac);
        // No subnet.env: not trusted.
        assert_eq!(
            PeerCache::load(&path, crate::subnet_env::read_previous_subnet(&env), me),
            None
        );
        let mut e = SubnetEnv {
            network: "10.5.0.0/16".parse().unwrap(),
            subnet: "10.5.3.0/24".parse().unwrap(),
            mtu: 1472,
            ipmasq: false,
        };
        e.write(&env).unwrap();
        assert_eq!(
            PeerCache::load(&path, crate::subnet_env::read_previous_subnet(&env), me),
            Some(c.clone())
        );
        // Another PublicIP, or subnet.env naming another subnet: not trusted.
        assert_eq!(
            PeerCache::load(
                &path,
                crate::subnet_env::read_previous_subnet(&env),
                Ipv4Addr::new(192, 168, 0, 9)
            ),
            None
        );
        e.subnet = "10.5.9.0/24".parse().unwrap();
        e.write(&env).unwrap();
        assert_eq!(
            PeerCache::load(&path, crate::subnet_env::read_previous_subnet(&env), me),
            None
        );
        // Garbage: ignored, never a panic.
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(
            PeerCache::load(&path, crate::subnet_env::read_previous_subnet(&env), me),
            None
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
