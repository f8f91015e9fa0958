//! Lease keys (`10.5.34.0-24`) and lease values (flannel's `LeaseAttrs` JSON).

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("lease key {0:?} is not of the form A.B.C.D-LEN")]
    Format(String),
    #[error("lease key {0:?} has host bits set below its prefix length")]
    Unaligned(String),
}

/// Formats a subnet as flannel's key suffix, e.g. `10.5.34.0-24`.
pub fn key_suffix(subnet: Ipv4Network) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix())
}

/// The full etcd key of a subnet lease under `prefix`.
pub fn lease_key(prefix: &str, subnet: Ipv4Network) -> String {
    format!(
        "{}/subnets/{}",
        prefix.trim_end_matches('/'),
        key_suffix(subnet)
    )
}

/// The etcd key prefix under which all leases live (with trailing slash).
pub fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", prefix.trim_end_matches('/'))
}

/// Parses the last path element of a lease key. A dual-stack suffix
/// (`&fc00::-64`) is accepted and ignored, as this flanneld is IPv4-only.
pub fn parse_key(key: &str) -> Result<Ipv4Network, KeyError> {
    let bad = || KeyError::Format(key.to_string());
    // A lease is a direct child of `<prefix>/subnets/`: a deeper key
    // (`…/subnets/x/10.5.1.0-24`) is not one, or any writer could alias
    // (or, by deleting the alias, unroute) another host's subnet.
    let last = match key.rsplit_once('/') {
        Some((dir, last)) if dir.ends_with("/subnets") || dir == "subnets" => last,
        Some(_) => return Err(bad()),
        None => key,
    };
    let v4 = match last.split_once('&') {
        Some((v4, v6)) => {
            let (ip6, len6) = v6.split_once('-').ok_or_else(bad)?;
            let ok6 = !ip6.is_empty()
                && ip6.chars().all(|c| c.is_ascii_hexdigit() || c == ':')
                && len6.parse::<u8>().is_ok_and(|l| l <= 128);
            if !ok6 {
                return Err(bad());
            }
            v4
        }
        None => last,
    };
    let (ip, len) = v4.split_once('-').ok_or_else(bad)?;
    // Only digits: rejects "+24", " 24" and the like that str::parse would accept.
    if len.is_empty() || len.len() > 2 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let net = Ipv4Network::new(ip, len).map_err(|_| bad())?;
    if net.network() != ip {
        return Err(KeyError::Unaligned(key.to_string()));
    }
    Ok(net)
}

/// flannel's `LeaseAttrs`. Field order and `omitempty` match Go's struct so
/// that what we write is byte-for-byte what the Go udp backend writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<String>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_type: Option<String>,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<serde_json::Value>,
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<serde_json::Value>,
}

impl LeaseAttrs {
    /// What the Go udp backend writes for a host: only PublicIP.
    pub fn udp(public_ip: Ipv4Addr) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: None,
            backend_data: None,
            backend_v6_data: None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("LeaseAttrs always serializes")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trip() {
        let n: Ipv4Network = "10.5.34.0/24".parse().unwrap();
        assert_eq!(key_suffix(n), "10.5.34.0-24");
        assert_eq!(
            lease_key("/coreos.com/network", n),
            "/coreos.com/network/subnets/10.5.34.0-24"
        );
        assert_eq!(
            lease_key("/coreos.com/network/", n),
            "/coreos.com/network/subnets/10.5.34.0-24"
        );
        assert_eq!(parse_key("/coreos.com/network/subnets/10.5.34.0-24"), Ok(n));
        assert_eq!(parse_key("10.5.34.0-24"), Ok(n));
    }

    #[test]
    fn dual_stack_keys_keep_their_v4_part() {
        assert_eq!(
            parse_key("/x/subnets/10.5.34.0-24&fc00:0:0:1::-64"),
            Ok("10.5.34.0/24".parse().unwrap())
        );
    }

    #[test]
    fn bad_keys_are_rejected() {
        for k in [
            "",
            "10.5.34.0",
            "10.5.34.0-",
            "10.5.34.0-33",
            "10.5.34.0-+4",
            "10.5.34-24",
            "10.5.34.0.1-24",
            "x.5.34.0-24",
            "10.5.34.0-24&",
            "10.5.34.0-24&zz::-64",
            "10.5.34.0-24&fc00::-129",
            "10.5.34.0-024000",
            // Not a direct child of the subnets directory: an alias.
            "/coreos.com/network/subnets/x/10.5.34.0-24",
            "/coreos.com/network/subnets/10.5.33.0-24/10.5.34.0-24",
            "/coreos.com/network/other/10.5.34.0-24",
        ] {
            assert!(parse_key(k).is_err(), "{k:?} should not parse");
        }
        assert_eq!(
            parse_key("10.5.34.7-24"),
            Err(KeyError::Unaligned("10.5.34.7-24".into()))
        );
    }

    #[test]
    fn we_write_exactly_what_go_udp_backend_writes() {
        let a = LeaseAttrs::udp(Ipv4Addr::new(192, 168, 1, 2));
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"192.168.1.2","PublicIPv6":null}"#
        );
        assert_eq!(LeaseAttrs::from_json(a.to_json().as_bytes()).unwrap(), a);
    }

    #[test]
    fn other_backends_leases_parse() {
        let v = br#"{"PublicIP":"192.168.1.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#;
        let a = LeaseAttrs::from_json(v).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::new(192, 168, 1, 3));
        assert_eq!(a.backend_type.as_deref(), Some("vxlan"));
        // Round trip keeps the extra fields.
        let again = LeaseAttrs::from_json(a.to_json().as_bytes()).unwrap();
        assert_eq!(again, a);
        // Minimal form without PublicIPv6 parses too.
        assert!(LeaseAttrs::from_json(br#"{"PublicIP":"1.2.3.4"}"#).is_ok());
    }

    #[test]
    fn malformed_values_are_errors() {
        for v in [
            &b"not json"[..],
            b"{}",
            br#"{"PublicIP":"1.2.3"}"#,
            br#"{"PublicIP":7}"#,
            br#"[]"#,
        ] {
            assert!(LeaseAttrs::from_json(v).is_err());
        }
    }
}
