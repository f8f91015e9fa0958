//! flannel's network config (`<prefix>/config`): parse and validate, no I/O.
//!
//! Go's `encoding/json` matches field names case-insensitively, so a config
//! that Go flanneld accepts (`"network"`, `"Network"`, `"NETWORK"`) is
//! accepted here too.

use ipnetwork::Ipv4Network;
use serde_json::{Map, Value};
use std::net::Ipv4Addr;

/// Default UDP port of flannel's udp backend.
pub const DEFAULT_UDP_PORT: u16 = 8285;
/// The kernel's VXLAN port, which flannel's vxlan backend uses for `Port: 0`.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// WireGuard's port, flannel's wireguard backend's default `ListenPort`.
pub const DEFAULT_WIREGUARD_PORT: u16 = 51820;

/// The network's backend (`Backend.Type` and its keys). One setting for
/// the whole network: every host encapsulates the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// flannel's udp backend: the IPv4 packet is the datagram.
    Udp {
        /// `Port` (default 8285).
        port: u16,
    },
    /// flannel's vxlan backend (RFC 7348), spoken in userspace.
    Vxlan(VxlanConfig),
    /// flannel's wireguard backend, spoken in userspace (WireGuard over
    /// our batched TUN data path).
    Wireguard(WireguardConfig),
}

/// The wireguard backend's keys, flannel's defaults filled in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct WireguardConfig {
    /// `ListenPort` (default 51820).
    pub listen_port: u16,
    /// `PSK`: the preshared key every peer uses (base64 of 32 bytes).
    pub psk: Option<[u8; 32]>,
    /// `PersistentKeepaliveInterval` in seconds (0: off).
    pub keepalive: u16,
    /// `MTU`: the MTU to subtract the 80-byte overhead from, in place of
    /// the external interface's.
    pub mtu: Option<u32>,
}

// The PSK is a secret: never printed.
impl std::fmt::Debug for WireguardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireguardConfig")
            .field("listen_port", &self.listen_port)
            .field("psk", &self.psk.map(|_| "<set>"))
            .field("keepalive", &self.keepalive)
            .field("mtu", &self.mtu)
            .finish()
    }
}

/// The vxlan backend's keys, flannel's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanConfig {
    /// `VNI` (default 1; 24 bits).
    pub vni: u32,
    /// `Port` (0 = the kernel's 8472).
    pub port: u16,
    /// `DirectRouting`: peers on our L2 subnet get a plain kernel route.
    pub direct_routing: bool,
    /// `MTU`: the MTU to subtract the 50-byte overhead from, in place of
    /// the external interface's.
    pub mtu: Option<u32>,
}

impl Backend {
    /// `Backend.Type` as flannel names it (and as leases carry it).
    pub fn type_name(&self) -> &'static str {
        match self {
            Backend::Udp { .. } => "udp",
            Backend::Vxlan(_) => "vxlan",
            Backend::Wireguard(_) => "wireguard",
        }
    }

    /// The UDP port hosts receive on.
    pub fn port(&self) -> u16 {
        match self {
            Backend::Udp { port } => *port,
            Backend::Vxlan(v) => v.port,
            Backend::Wireguard(w) => w.listen_port,
        }
    }

    fn parse(b: &Fields) -> Result<Self, ConfigError> {
        // Field errors carry the full path (`Backend.Port`).
        let named = |e: ConfigError| match e {
            ConfigError::Field { field, reason } => {
                let full = BACKEND_FIELDS
                    .iter()
                    .find(|(short, _)| *short == field)
                    .map_or(field, |(_, full)| full);
                field_err(full, reason)
            }
            other => other,
        };
        let ty = b.string("Type").map_err(named)?.unwrap_or("udp");
        let port = b.uint("Port", 65535).map_err(named)?.unwrap_or(0) as u16;
        if ty.eq_ignore_ascii_case("udp") {
            return Ok(Backend::Udp {
                port: if port == 0 { DEFAULT_UDP_PORT } else { port },
            });
        }
        if ty.eq_ignore_ascii_case("wireguard") {
            return Self::parse_wireguard(b).map_err(named);
        }
        if !ty.eq_ignore_ascii_case("vxlan") {
            return Err(field_err(
                "Backend.Type",
                format!("backend {ty:?} is not supported: this flanneld implements \"udp\", \"vxlan\" and \"wireguard\""),
            ));
        }
        let vni = b.uint("VNI", (1 << 24) - 1).map_err(named)?.unwrap_or(1) as u32;
        if b.bool("GBP").map_err(named)? == Some(true) {
            return Err(field_err(
                "Backend.GBP",
                "VXLAN group-based policy is not implemented by this flanneld; remove GBP or set it to false",
            ));
        }
        if b.bool("Learning").map_err(named)? == Some(true) {
            return Err(field_err(
                "Backend.Learning",
                "learning VTEPs are not implemented by this flanneld (peers come from their leases); remove Learning or set it to false",
            ));
        }
        let direct_routing = b.bool("DirectRouting").map_err(named)?.unwrap_or(false);
        let mtu = backend_mtu(b, 50, "VXLAN").map_err(named)?;
        Ok(Backend::Vxlan(VxlanConfig {
            vni,
            port: if port == 0 { DEFAULT_VXLAN_PORT } else { port },
            direct_routing,
            mtu,
        }))
    }
}

impl Backend {
    /// The wireguard backend's keys (flannel's `pkg/backend/wireguard`).
    fn parse_wireguard(b: &Fields) -> Result<Self, ConfigError> {
        let listen_port = match b.uint("ListenPort", 65535)? {
            None | Some(0) => DEFAULT_WIREGUARD_PORT,
            Some(p) => p as u16,
        };
        let psk = match b.string("PSK")? {
            None | Some("") => None,
            Some(text) => Some(
                crate::wireguard::key_from_base64(text)
                    .map_err(|e| field_err("PSK", format!("{e} (make one with `wg genpsk`)")))?,
            ),
        };
        let keepalive = b.uint("PersistentKeepaliveInterval", 65535)?.unwrap_or(0) as u16;
        let mtu = backend_mtu(b, 80, "WireGuard")?;
        match b.string("Mode")? {
            None | Some("") => {}
            Some(m) if ["separate", "auto", "ipv4"].iter().any(|k| m.eq_ignore_ascii_case(k)) => {}
            Some(m) if m.eq_ignore_ascii_case("ipv6") => {
                return Err(field_err(
                    "Mode",
                    "\"ipv6\" is not implemented by this flanneld, which carries IPv4 only; use \"separate\", \"auto\" or \"ipv4\"",
                ))
            }
            Some(m) => {
                return Err(field_err(
                    "Mode",
                    format!("{m:?} is not a wireguard mode: use \"separate\" (the default), \"auto\" or \"ipv4\""),
                ))
            }
        }
        Ok(Backend::Wireguard(WireguardConfig {
            listen_port,
            psk,
            keepalive,
            mtu,
        }))
    }
}

/// `Backend.MTU`: absent or 0 means the external interface's; else it
/// must leave IPv4's 68 bytes after the backend's `overhead`.
fn backend_mtu(b: &Fields, overhead: u64, what: &str) -> Result<Option<u32>, ConfigError> {
    match b.uint("MTU", 65535)? {
        None | Some(0) => Ok(None),
        Some(m) if m < 68 + overhead => Err(field_err(
            "MTU",
            format!(
                "{m} leaves less than IPv4's 68 bytes after the {overhead}-byte {what} overhead"
            ),
        )),
        Some(m) => Ok(Some(m as u32)),
    }
}

/// Backend keys and the name an error gives them.
const BACKEND_FIELDS: [(&str, &str); 11] = [
    ("Type", "Backend.Type"),
    ("Port", "Backend.Port"),
    ("VNI", "Backend.VNI"),
    ("GBP", "Backend.GBP"),
    ("Learning", "Backend.Learning"),
    ("DirectRouting", "Backend.DirectRouting"),
    ("MTU", "Backend.MTU"),
    ("ListenPort", "Backend.ListenPort"),
    ("PSK", "Backend.PSK"),
    (
        "PersistentKeepaliveInterval",
        "Backend.PersistentKeepaliveInterval",
    ),
    ("Mode", "Backend.Mode"),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("network config is not valid JSON: {0}")]
    Json(String),
    #[error("network config must be a JSON object")]
    NotObject,
    #[error("network config field {field}: {reason}")]
    Field { field: &'static str, reason: String },
}

fn field_err(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        reason: reason.into(),
    }
}

/// A validated IPv4 network config with all defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Network,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    /// The UDP port every host of the network receives on (`Backend.Port`,
    /// or the backend's default).
    pub port: u16,
    /// `Backend`: which encapsulation the whole network uses.
    pub backend: Backend,
    /// `EnableNFTables`: program --ip-masq rules with nft instead of iptables.
    pub enable_nftables: bool,
}

/// Case-insensitive view of a JSON object, as Go's decoder sees it.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0
            .get(name)
            .or_else(|| {
                self.0
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v)
            })
            .filter(|v| !v.is_null())
    }

    fn string(&self, name: &'static str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(field_err(name, format!("expected a string, got {other}"))),
        }
    }

    fn bool(&self, name: &'static str) -> Result<Option<bool>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(field_err(
                name,
                format!("expected true or false, got {other}"),
            )),
        }
    }

    fn uint(&self, name: &'static str, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Ok(Some(n)),
                _ => Err(field_err(
                    name,
                    format!("expected an integer between 0 and {max}, got {v}"),
                )),
            },
        }
    }
}

fn parse_ip(field: &'static str, s: &str) -> Result<Ipv4Addr, ConfigError> {
    s.parse()
        .map_err(|_| field_err(field, format!("{s:?} is not an IPv4 address")))
}

impl NetworkConfig {
    /// Parses and validates flannel's config JSON, applying flannel's defaults.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        let obj = value.as_object().ok_or(ConfigError::NotObject)?;
        let f = Fields(obj);

        if f.bool("EnableIPv4")? == Some(false) {
            return Err(field_err(
                "EnableIPv4",
                "IPv4 is disabled, but this flanneld only carries IPv4",
            ));
        }
        if f.bool("EnableIPv6")? == Some(true) || f.get("IPv6Network").is_some() {
            return Err(field_err(
                "EnableIPv6",
                "IPv6 networks are not supported by this flanneld (udp backend is IPv4-only)",
            ));
        }

        let network_s = f
            .string("Network")?
            .ok_or_else(|| field_err("Network", "missing (e.g. \"10.5.0.0/16\")"))?;
        let network: Ipv4Network = network_s
            .parse()
            .map_err(|_| field_err("Network", format!("{network_s:?} is not an IPv4 CIDR")))?;
        let network = Ipv4Network::new(network.network(), network.prefix())
            .expect("prefix came from a valid network");

        let subnet_len = match f.uint("SubnetLen", 32)? {
            // Go treats 0 as "not set".
            None | Some(0) => {
                if network.prefix() > 28 {
                    return Err(field_err(
                        "Network",
                        format!("{network} is too small: the prefix must be /28 or shorter"),
                    ));
                } else if network.prefix() <= 22 {
                    24
                } else {
                    network.prefix() + 2
                }
            }
            Some(n) => {
                let n = n as u8;
                if n > 30 {
                    return Err(field_err("SubnetLen", format!("{n} is larger than 30")));
                }
                if n < network.prefix() + 2 {
                    return Err(field_err(
                        "SubnetLen",
                        format!(
                            "{n} is too short for {network}: the network must be able to accommodate at least four subnets"
                        ),
                    ));
                }
                n
            }
        };

        let size = subnet_size(subnet_len);
        let net_start = u32::from(network.network());
        let net_end = u32::from(network.broadcast());
        let default_min = net_start + size;
        let default_max = net_end - (size - 1);

        let bound = |field: &'static str, default: u32| -> Result<Ipv4Addr, ConfigError> {
            let ip = match f.string(field)? {
                None => return Ok(Ipv4Addr::from(default)),
                Some(s) => parse_ip(field, s)?,
            };
            if !network.contains(ip) {
                return Err(field_err(
                    field,
                    format!("{ip} is not inside Network {network}"),
                ));
            }
            if u32::from(ip) & mask(subnet_len) != u32::from(ip) {
                return Err(field_err(
                    field,
                    format!("{ip} is not on a /{subnet_len} (SubnetLen) boundary"),
                ));
            }
            Ok(ip)
        };
        let subnet_min = bound("SubnetMin", default_min)?;
        let subnet_max = bound("SubnetMax", default_max)?;
        if u32::from(subnet_min) > u32::from(subnet_max) {
            return Err(field_err(
                "SubnetMax",
                format!("{subnet_max} is below SubnetMin {subnet_min}"),
            ));
        }

        let backend = match f.get("Backend") {
            None => Backend::Udp {
                port: DEFAULT_UDP_PORT,
            },
            Some(Value::Object(b)) => Backend::parse(&Fields(b))?,
            Some(other) => {
                return Err(field_err(
                    "Backend",
                    format!("expected an object, got {other}"),
                ))
            }
        };

        Ok(NetworkConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            port: backend.port(),
            backend,
            enable_nftables: f.bool("EnableNFTables")?.unwrap_or(false),
        })
    }

    /// Number of addresses in one subnet.
    pub fn subnet_size(&self) -> u32 {
        subnet_size(self.subnet_len)
    }

    /// Whether a lease's subnet may be held under this config
    /// (flannel's `isSubnetConfigCompat`).
    pub fn fits(&self, subnet: Ipv4Network) -> bool {
        subnet.prefix() == self.subnet_len
            && subnet.network() >= self.subnet_min
            && subnet.network() <= self.subnet_max
    }
}

/// Number of addresses in a subnet of prefix length `len` (1..=32).
pub fn subnet_size(len: u8) -> u32 {
    1u32 << (32 - len as u32)
}

/// The netmask of prefix length `len` as a u32.
pub fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_for_a_slash_16() {
        let c =
            NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 5, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 5, 255, 0));
        assert_eq!(c.port, 8285);
        assert!(!c.enable_nftables);
        let n = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","EnableNFTables":true}"#).unwrap();
        assert!(n.enable_nftables);
    }

    #[test]
    fn backend_absent_means_udp_and_field_names_are_case_insensitive() {
        let c = NetworkConfig::parse(r#"{"network":"10.5.0.0/16","subnetlen":26}"#).unwrap();
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.port, 8285);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 5, 0, 64));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 5, 255, 192));
    }

    #[test]
    fn small_networks_get_prefix_plus_two() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/24"}"#).unwrap();
        assert_eq!(c.subnet_len, 26);
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/22"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        let e = NetworkConfig::parse(r#"{"Network":"10.5.0.0/29"}"#).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
    }

    #[test]
    fn explicit_port_min_max() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.20.0","Backend":{"Type":"udp","Port":9000}}"#,
        )
        .unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 5, 10, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 5, 20, 0));
        assert!(c.fits("10.5.10.0/24".parse().unwrap()));
        assert!(!c.fits("10.5.21.0/24".parse().unwrap()));
        assert!(!c.fits("10.5.10.0/25".parse().unwrap()));
    }

    fn err_field(json: &str) -> String {
        match NetworkConfig::parse(json).unwrap_err() {
            ConfigError::Field { field, .. } => field.to_string(),
            other => panic!("expected a field error, got {other}"),
        }
    }

    #[test]
    fn bad_configs_name_the_field() {
        assert_eq!(err_field(r#"{}"#), "Network");
        assert_eq!(err_field(r#"{"Network":"10.5.0.0"}"#), "Network");
        assert_eq!(err_field(r#"{"Network":7}"#), "Network");
        assert_eq!(
            err_field(r#"{"Network":"10.5.0.0/16","SubnetLen":31}"#),
            "SubnetLen"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.5.0.0/16","SubnetLen":17}"#),
            "SubnetLen"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.5.0.0/16","SubnetLen":-1}"#),
            "SubnetLen"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.6.0.0"}"#),
            "SubnetMin"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.3.7"}"#),
            "SubnetMax"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.3.0"}"#),
            "SubnetMax"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#),
            "Backend.Type"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","GBP":true}}"#),
            "Backend.GBP"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","learning":true}}"#),
            "Backend.Learning"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#),
            "Backend.VNI"
        );
        assert_eq!(
            err_field(
                r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","DirectRouting":"yes"}}"#
            ),
            "Backend.DirectRouting"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","MTU":100}}"#),
            "Backend.MTU"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":70000}}"#),
            "Backend.Port"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.5.0.0/16","EnableIPv6":true}"#),
            "EnableIPv6"
        );
        assert!(matches!(
            NetworkConfig::parse("{not json"),
            Err(ConfigError::Json(_))
        ));
        assert_eq!(NetworkConfig::parse("[1]"), Err(ConfigError::NotObject));
    }

    #[test]
    fn vxlan_defaults_and_keys_are_case_insensitive() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#)
            .unwrap();
        let want = VxlanConfig {
            vni: 1,
            port: 8472,
            direct_routing: false,
            mtu: None,
        };
        assert_eq!(c.backend, Backend::Vxlan(want));
        assert_eq!(c.port, 8472);
        let c = NetworkConfig::parse(
            r#"{"Network":"10.5.0.0/16","Backend":{"type":"VXLAN","vni":7,"port":4789,"directRouting":true,"GBP":false,"Learning":false,"MTU":9000}}"#,
        )
        .unwrap();
        assert_eq!(
            c.backend,
            Backend::Vxlan(VxlanConfig {
                vni: 7,
                port: 4789,
                direct_routing: true,
                mtu: Some(9000),
            })
        );
        assert_eq!(c.port, 4789);
        assert_eq!(c.backend.type_name(), "vxlan");
        let u = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        assert_eq!(u.backend, Backend::Udp { port: 8285 });
    }

    #[test]
    fn network_host_bits_are_masked() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.3.4/16"}"#).unwrap();
        assert_eq!(c.network.to_string(), "10.5.0.0/16");
    }

    #[test]
    fn wireguard_keys_defaults_and_refusals() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard"}}"#)
            .unwrap();
        assert_eq!(c.port, DEFAULT_WIREGUARD_PORT);
        let Backend::Wireguard(w) = c.backend else {
            panic!()
        };
        assert_eq!(
            (w.listen_port, w.psk, w.keepalive, w.mtu),
            (51820, None, 0, None)
        );
        let psk = crate::wireguard::key_to_base64(&[5; 32]);
        let c = NetworkConfig::parse(&format!(
            r#"{{"Network":"10.5.0.0/16","Backend":{{"type":"WireGuard","listenPort":51999,"psk":"{psk}","persistentKeepaliveInterval":25,"mtu":1400,"mode":"Separate"}}}}"#
        ))
        .unwrap();
        assert_eq!(c.port, 51999);
        assert_eq!(c.backend.type_name(), "wireguard");
        let Backend::Wireguard(w) = c.backend else {
            panic!()
        };
        assert_eq!(
            (w.listen_port, w.psk, w.keepalive, w.mtu),
            (51999, Some([5; 32]), 25, Some(1400))
        );
        assert!(!format!("{w:?}").contains(&psk), "the PSK is never printed");
        for (json, field) in [
            (r#""PSK":"short""#, "Backend.PSK"),
            (r#""Mode":"ipv6""#, "Backend.Mode"),
            (r#""Mode":"both""#, "Backend.Mode"),
            (r#""ListenPort":70000"#, "Backend.ListenPort"),
            (
                r#""PersistentKeepaliveInterval":"25s""#,
                "Backend.PersistentKeepaliveInterval",
            ),
            (r#""MTU":100"#, "Backend.MTU"),
        ] {
            assert_eq!(
                err_field(&format!(
                    r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"wireguard",{json}}}}}"#
                )),
                field,
                "{json}"
            );
        }
    }
}
