//! The backend seam: everything that differs between flannel's udp and
//! vxlan backends, as plain values and functions (no I/O). What a lease
//! carries (`BackendType`, `BackendData`), how a peer's lease is read, the
//! underlay overhead that sets the MTU, and the [`Encap`] the data path is
//! given: what goes before each IPv4 packet inside the datagram, and how a
//! received datagram is unwrapped.
//!
//! The data-path loops are the same for every backend; only this value
//! changes.

use crate::config::Backend;
use crate::forward::DropReason;
use crate::subnet::LeaseAttrs;
use crate::wire::ether::{
    self, ArpRepr, EthernetFrame, Mac, VxlanPacket, ARP_REQUEST, ETHERTYPE_ARP, ETHERTYPE_IPV4,
    VXLAN_PREFIX,
};
use serde_json::Value;
use std::fmt;
use std::net::Ipv4Addr;

/// A peer as its lease describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub ip: Ipv4Addr,
    /// Its VtepMAC (vxlan backend).
    pub mac: Option<Mac>,
    /// Its WireGuard public key (wireguard backend).
    pub key: Option<[u8; 32]>,
    /// The port it receives on, when its lease names one (wireguard's
    /// `BackendData.Port`); else the network's.
    pub port: Option<u16>,
}

impl From<Ipv4Addr> for Peer {
    fn from(ip: Ipv4Addr) -> Self {
        Peer {
            ip,
            mac: None,
            key: None,
            port: None,
        }
    }
}

impl From<[u8; 4]> for Peer {
    fn from(ip: [u8; 4]) -> Self {
        Ipv4Addr::from(ip).into()
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mac {
            Some(m) => write!(f, "{} ({m})", self.ip),
            None => write!(f, "{}", self.ip),
        }
    }
}

/// Why a peer's lease does not fit this network's backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendReject {
    #[error("its BackendType is {found:?}, but this network runs the {want} backend")]
    Type { found: String, want: &'static str },
    #[error("its BackendData is not valid for the vxlan backend: {0}")]
    Data(String),
    #[error("its BackendData is not valid for the wireguard backend: {0}")]
    WireguardData(String),
}

/// Our own backend identity, as our lease carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Identity {
    /// vxlan: our VtepMAC.
    pub mac: Option<Mac>,
    /// wireguard: our public key.
    pub key: Option<[u8; 32]>,
}

/// What our own lease says besides PublicIP: (`BackendType`, `BackendData`).
/// The udp backend writes neither, exactly as Go's does.
pub fn lease_fields(backend: &Backend, id: Identity) -> (Option<String>, Option<Value>) {
    match backend {
        Backend::Udp { .. } => (None, None),
        Backend::Vxlan(v) => (
            Some("vxlan".into()),
            Some(serde_json::json!({
                "VNI": v.vni,
                "VtepMAC": id.mac.unwrap_or_default().to_string(),
            })),
        ),
        // flannel's wireguardLeaseAttrs: {PublicKey, Port}.
        Backend::Wireguard(w) => (
            Some("wireguard".into()),
            Some(serde_json::json!({
                "PublicKey": crate::wireguard::key_to_base64(&id.key.unwrap_or_default()),
                "Port": w.listen_port,
            })),
        ),
    }
}

/// Our lease's value.
pub fn lease_attrs(backend: &Backend, public_ip: Ipv4Addr, id: Identity) -> LeaseAttrs {
    let (backend_type, backend_data) = lease_fields(backend, id);
    LeaseAttrs {
        backend_type,
        backend_data,
        ..LeaseAttrs::udp(public_ip)
    }
}

/// Reads a peer from its lease, as this network's backend needs it. On
/// the udp backend any lease is a peer (Go's udp backend ignores the
/// backend fields); on vxlan, flannel ignores leases of another type and
/// those whose BackendData does not decode, and so do we.
pub fn peer(backend: &Backend, attrs: &LeaseAttrs) -> Result<Peer, BackendReject> {
    let v = match backend {
        Backend::Udp { .. } => return Ok(attrs.public_ip.into()),
        Backend::Wireguard(_) => return wireguard_peer(attrs),
        Backend::Vxlan(v) => v,
    };
    let found = attrs.backend_type.as_deref().unwrap_or("");
    if found != "vxlan" {
        return Err(BackendReject::Type {
            found: found.into(),
            want: "vxlan",
        });
    }
    let data = attrs
        .backend_data
        .as_ref()
        .and_then(Value::as_object)
        .ok_or_else(|| BackendReject::Data("not a JSON object".into()))?;
    // Go's decoder matches field names case-insensitively.
    let get = |name: &str| {
        data.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    };
    let vni = get("VNI")
        .ok_or_else(|| BackendReject::Data("VNI is missing".into()))?
        .as_u64()
        .filter(|&n| n < 1 << 24)
        .ok_or_else(|| BackendReject::Data("VNI is not a 24-bit number".into()))?;
    if vni != u64::from(v.vni) {
        return Err(BackendReject::Data(format!(
            "VNI {vni} differs from the network's {}",
            v.vni
        )));
    }
    let mac: Mac = get("VtepMAC")
        .and_then(Value::as_str)
        .ok_or_else(|| BackendReject::Data("VtepMAC is missing or not a string".into()))?
        .parse()
        .map_err(|e: ether::BadMac| BackendReject::Data(e.to_string()))?;
    if !mac.is_unicast() || mac == Mac::default() {
        return Err(BackendReject::Data(format!(
            "VtepMAC {mac} is not a unicast address"
        )));
    }
    Ok(Peer {
        mac: Some(mac),
        ..attrs.public_ip.into()
    })
}

/// A wireguard lease (flannel's `{"PublicKey": <base64>, "Port": n}`;
/// older flannel writes no Port, and a Port of 0 means the same: the
/// network's ListenPort).
fn wireguard_peer(attrs: &LeaseAttrs) -> Result<Peer, BackendReject> {
    let found = attrs.backend_type.as_deref().unwrap_or("");
    if found != "wireguard" {
        return Err(BackendReject::Type {
            found: found.into(),
            want: "wireguard",
        });
    }
    let bad = |s: &str| BackendReject::WireguardData(s.into());
    let data = attrs
        .backend_data
        .as_ref()
        .and_then(Value::as_object)
        .ok_or_else(|| bad("not a JSON object"))?;
    let get = |name: &str| {
        data.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    };
    let text = get("PublicKey")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("PublicKey is missing or not a string"))?;
    let key = crate::wireguard::key_from_base64(text)
        .map_err(|e| BackendReject::WireguardData(format!("PublicKey {e}")))?;
    if key == [0u8; 32] {
        return Err(bad("PublicKey is all zeros"));
    }
    let port = match get("Port") {
        None | Some(Value::Null) => None,
        Some(p) => match p.as_u64() {
            Some(0) => None,
            Some(n) if n <= 65535 => Some(n as u16),
            _ => return Err(bad("Port is not a port number")),
        },
    };
    Ok(Peer {
        key: Some(key),
        port,
        ..attrs.public_ip.into()
    })
}

/// The VtepMAC a lease of ours carries (to keep it across restarts).
pub fn vtep_mac(attrs: &LeaseAttrs) -> Option<Mac> {
    attrs
        .backend_data
        .as_ref()?
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("VtepMAC"))?
        .1
        .as_str()?
        .parse()
        .ok()
        .filter(|m: &Mac| m.is_unicast() && *m != Mac::default())
}

/// Bytes the backend adds on the underlay: the TUN's MTU is the
/// interface's less this (flannel: 28 for udp, 50 for vxlan).
pub fn overhead(backend: &Backend) -> u32 {
    match backend {
        Backend::Udp { .. } => crate::wire::ENCAP_OVERHEAD as u32,
        Backend::Vxlan(_) => ether::VXLAN_OVERHEAD as u32,
        Backend::Wireguard(_) => crate::wireguard::OVERHEAD as u32,
    }
}

/// How the data path wraps and unwraps packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    /// udp backend: the datagram is the IPv4 packet.
    Plain,
    /// vxlan backend: VXLAN header + Ethernet header before the packet.
    Vxlan { vni: u32, mac: Mac },
    /// wireguard backend: each packet sealed whole into a data message
    /// (see [`crate::wireguard`]); nothing is put before it in the clear.
    Wireguard,
}

/// What a received datagram (one segment of a GRO train) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decap {
    /// An IPv4 packet starting at this offset.
    Packet(usize),
    /// An ARP request (a kernel peer resolving our VTEP address).
    Arp(ArpRepr),
    Drop(DropReason),
}

impl Encap {
    pub fn for_backend(backend: &Backend, mac: Mac) -> Encap {
        match backend {
            Backend::Udp { .. } => Encap::Plain,
            Backend::Vxlan(v) => Encap::Vxlan { vni: v.vni, mac },
            Backend::Wireguard(_) => Encap::Wireguard,
        }
    }

    /// Bytes put before each IPv4 packet.
    #[inline]
    pub fn prefix_len(&self) -> usize {
        match self {
            Encap::Plain | Encap::Wireguard => 0,
            Encap::Vxlan { .. } => VXLAN_PREFIX,
        }
    }

    /// Where the inner IPv4 packet starts in a datagram's payload, when it
    /// is there in the clear (to steer datagrams by their inner flow).
    pub fn clear_inner_offset(&self) -> Option<usize> {
        match self {
            Encap::Wireguard => None,
            e => Some(e.prefix_len()),
        }
    }

    /// Writes the prefix for a packet to `peer_mac` into
    /// `out[..prefix_len()]`.
    #[inline]
    pub fn write_prefix(&self, peer_mac: Mac, out: &mut [u8]) {
        if let Encap::Vxlan { vni, mac } = *self {
            out[..VXLAN_PREFIX].copy_from_slice(&ether::vxlan_prefix(vni, peer_mac, mac));
        }
    }

    /// Unwraps one received datagram. A kernel VXLAN sender uses any
    /// source port and usually no outer UDP checksum: neither matters
    /// here (the kernel checked the UDP layer). Only our VNI, only frames
    /// to our VtepMAC (or ARP broadcasts), only IPv4 or ARP inside.
    #[inline]
    pub fn decap(&self, d: &[u8]) -> Decap {
        let Encap::Vxlan { vni, mac } = *self else {
            return Decap::Packet(0);
        };
        let Ok(v) = VxlanPacket::new_checked(d) else {
            return Decap::Drop(DropReason::Malformed);
        };
        if v.vni() != vni {
            return Decap::Drop(DropReason::WrongVni);
        }
        let Ok(e) = EthernetFrame::new_checked(v.payload()) else {
            return Decap::Drop(DropReason::Malformed);
        };
        match e.ethertype() {
            ETHERTYPE_IPV4 if e.dst() == mac => Decap::Packet(VXLAN_PREFIX),
            ETHERTYPE_IPV4 => Decap::Drop(DropReason::WrongMac),
            ETHERTYPE_ARP if e.dst() == mac || e.dst() == Mac::BROADCAST => {
                match ArpRepr::parse(e.payload()) {
                    Some(a) if a.op == ARP_REQUEST => Decap::Arp(a),
                    _ => Decap::Drop(DropReason::Malformed),
                }
            }
            ETHERTYPE_ARP => Decap::Drop(DropReason::WrongMac),
            _ => Decap::Drop(DropReason::NotIpv4),
        }
    }

    /// The answer to an ARP request received from `from`, if it asks for
    /// our VTEP address (`own`: our subnet's network address) and comes
    /// from the peer it claims to be (`sender`: the route to its
    /// address): a whole datagram to send back to that peer.
    pub fn arp_answer(
        &self,
        req: &ArpRepr,
        own: Ipv4Addr,
        from: Ipv4Addr,
        sender: Option<crate::routes::Hop>,
    ) -> Option<[u8; ether::VXLAN_ARP_LEN]> {
        let Encap::Vxlan { vni, mac } = *self else {
            return None;
        };
        if req.target_ip != own || sender.is_none_or(|h| *h.addr.ip() != from) {
            return None;
        }
        Some(ether::vxlan_arp(vni, req.sender_mac, mac, &req.reply(mac)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NetworkConfig, VxlanConfig};
    use crate::routes::Hop;

    fn vxlan() -> Backend {
        NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":7}}"#)
            .unwrap()
            .backend
    }

    const MAC: Mac = Mac([0x02, 0x42, 0, 0, 0, 1]);

    #[test]
    fn our_vxlan_lease_is_what_go_flanneld_writes() {
        let a = lease_attrs(
            &vxlan(),
            Ipv4Addr::new(192, 168, 0, 1),
            Identity {
                mac: Some(MAC),
                key: None,
            },
        );
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"192.168.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":7,"VtepMAC":"02:42:00:00:00:01"}}"#
        );
        assert_eq!(vtep_mac(&a), Some(MAC));
        let u = lease_attrs(
            &Backend::Udp { port: 8285 },
            Ipv4Addr::new(192, 168, 0, 1),
            Identity::default(),
        );
        assert_eq!(
            u.to_json(),
            r#"{"PublicIP":"192.168.0.1","PublicIPv6":null}"#
        );
        assert_eq!(vtep_mac(&u), None);
    }

    #[test]
    fn vxlan_peers_need_the_type_a_vni_and_a_mac() {
        let b = vxlan();
        let parse = |json: &str| peer(&b, &LeaseAttrs::from_json(json.as_bytes()).unwrap());
        let good = parse(
            r#"{"PublicIP":"192.168.0.2","BackendType":"vxlan","BackendData":{"VNI":7,"VtepMAC":"0a:bb:cc:dd:ee:ff"}}"#,
        )
        .unwrap();
        assert_eq!(good.mac, Some(Mac([0x0a, 0xbb, 0xcc, 0xdd, 0xee, 0xff])));
        assert_eq!(good.to_string(), "192.168.0.2 (0a:bb:cc:dd:ee:ff)");
        for bad in [
            r#"{"PublicIP":"192.168.0.2"}"#,
            r#"{"PublicIP":"192.168.0.2","BackendType":"udp"}"#,
            r#"{"PublicIP":"192.168.0.2","BackendType":"host-gw"}"#,
            r#"{"PublicIP":"192.168.0.2","BackendType":"vxlan"}"#,
            r#"{"PublicIP":"192.168.0.2","BackendType":"vxlan","BackendData":{"VtepMAC":"0a:bb:cc:dd:ee:ff"}}"#,
            r#"{"PublicIP":"192.168.0.2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:bb:cc:dd:ee:ff"}}"#,
            r#"{"PublicIP":"192.168.0.2","BackendType":"vxlan","BackendData":{"VNI":7,"VtepMAC":"nope"}}"#,
            r#"{"PublicIP":"192.168.0.2","BackendType":"vxlan","BackendData":{"VNI":7,"VtepMAC":"ff:ff:ff:ff:ff:ff"}}"#,
            r#"{"PublicIP":"192.168.0.2","BackendType":"vxlan","BackendData":[1]}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        // The udp backend takes any lease.
        let u = peer(
            &Backend::Udp { port: 8285 },
            &LeaseAttrs::from_json(br#"{"PublicIP":"192.168.0.2","BackendType":"vxlan"}"#).unwrap(),
        )
        .unwrap();
        assert_eq!(u, Peer::from(Ipv4Addr::new(192, 168, 0, 2)));
    }

    #[test]
    fn overheads_match_flannel() {
        assert_eq!(overhead(&Backend::Udp { port: 8285 }), 28);
        assert_eq!(overhead(&vxlan()), 50);
        let v = VxlanConfig {
            vni: 1,
            port: 8472,
            direct_routing: false,
            mtu: None,
        };
        assert_eq!(overhead(&Backend::Vxlan(v)), 50);
    }

    #[test]
    fn decap_takes_only_our_vni_our_mac_and_ipv4_or_arp() {
        let e = Encap::for_backend(&vxlan(), MAC);
        assert_eq!(e.prefix_len(), 22);
        let peer = Mac([0x02, 0, 0, 0, 0, 9]);
        let mut d = vec![0u8; 22 + 20];
        e.write_prefix(MAC, &mut d);
        assert_eq!(e.decap(&d), Decap::Packet(22));
        // Written towards a peer: the destination is the peer's MAC.
        e.write_prefix(peer, &mut d);
        assert_eq!(&d[8..14], &peer.0);
        assert_eq!(&d[14..20], &MAC.0);
        assert_eq!(e.decap(&d), Decap::Drop(DropReason::WrongMac));
        d[..22].copy_from_slice(&ether::vxlan_prefix(8, MAC, peer));
        assert_eq!(e.decap(&d), Decap::Drop(DropReason::WrongVni));
        d[..22].copy_from_slice(&ether::vxlan_prefix(7, MAC, peer));
        d[20..22].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(e.decap(&d), Decap::Drop(DropReason::NotIpv4));
        assert_eq!(e.decap(&d[..21]), Decap::Drop(DropReason::Malformed));
        assert_eq!(e.decap(&[0u8; 30]), Decap::Drop(DropReason::Malformed));
        assert_eq!(Encap::Plain.decap(&d), Decap::Packet(0));
        assert_eq!(Encap::Plain.prefix_len(), 0);
    }

    #[test]
    fn arp_for_our_vtep_address_from_a_known_peer_is_answered() {
        let e = Encap::for_backend(&vxlan(), MAC);
        let peer_mac = Mac([0x02, 0, 0, 0, 0, 9]);
        let req = ArpRepr {
            op: ARP_REQUEST,
            sender_mac: peer_mac,
            sender_ip: Ipv4Addr::new(10, 5, 2, 0),
            target_mac: Mac::default(),
            target_ip: Ipv4Addr::new(10, 5, 1, 0),
        };
        let d = ether::vxlan_arp(7, Mac::BROADCAST, peer_mac, &req);
        assert_eq!(e.decap(&d), Decap::Arp(req));
        let own = Ipv4Addr::new(10, 5, 1, 0);
        let from = Ipv4Addr::new(192, 168, 0, 2);
        let hop = Hop {
            addr: std::net::SocketAddrV4::new(from, 8472),
            mac: peer_mac,
        };
        let answer = e.arp_answer(&req, own, from, Some(hop)).unwrap();
        let Decap::Drop(_) = Encap::for_backend(&vxlan(), peer_mac).decap(&answer) else {
            panic!("a reply is not a request");
        };
        let v = VxlanPacket::new_checked(&answer[..]).unwrap();
        let f = EthernetFrame::new_checked(v.payload()).unwrap();
        assert_eq!((f.dst(), f.src()), (peer_mac, MAC));
        let r = ArpRepr::parse(f.payload()).unwrap();
        assert_eq!((r.sender_mac, r.sender_ip), (MAC, own));
        // Someone else's address, an unknown sender, or a sender that is
        // not where its claimed address's lease says: no answer.
        let other = ArpRepr {
            target_ip: Ipv4Addr::new(10, 5, 3, 0),
            ..req
        };
        assert!(e.arp_answer(&other, own, from, Some(hop)).is_none());
        assert!(e.arp_answer(&req, own, from, None).is_none());
        assert!(e
            .arp_answer(&req, own, Ipv4Addr::new(192, 168, 0, 66), Some(hop))
            .is_none());
    }

    #[test]
    fn wireguard_leases_are_flannels_and_bad_ones_are_refused() {
        let wg: Backend = crate::config::NetworkConfig::parse(
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard","ListenPort":51821}}"#,
        )
        .unwrap()
        .backend;
        let ip = Ipv4Addr::new(192, 168, 0, 1);
        let key = [0x11u8; 32];
        let a = lease_attrs(
            &wg,
            ip,
            Identity {
                mac: None,
                key: Some(key),
            },
        );
        let text = crate::wireguard::key_to_base64(&key);
        assert_eq!(
            a.to_json(),
            format!(
                r#"{{"PublicIP":"192.168.0.1","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"Port":51821,"PublicKey":"{text}"}}}}"#
            )
        );
        let p = peer(&wg, &a).unwrap();
        assert_eq!((p.key, p.port), (Some(key), Some(51821)));
        let attrs = |ty: &str, data: serde_json::Value| LeaseAttrs {
            backend_type: Some(ty.into()),
            backend_data: Some(data),
            ..LeaseAttrs::udp(ip)
        };
        // Older flannel writes no Port: the network's ListenPort applies.
        let p = peer(
            &wg,
            &attrs("wireguard", serde_json::json!({"publickey": text})),
        )
        .unwrap();
        assert_eq!(p.port, None);
        for bad in [
            attrs("vxlan", serde_json::json!({"PublicKey": text})),
            attrs("wireguard", serde_json::json!({"PublicKey": "AAAA"})),
            attrs(
                "wireguard",
                serde_json::json!({"PublicKey": crate::wireguard::key_to_base64(&[0; 32])}),
            ),
            attrs(
                "wireguard",
                serde_json::json!({"PublicKey": text, "Port": 70000}),
            ),
            attrs("wireguard", serde_json::json!({})),
        ] {
            assert!(peer(&wg, &bad).is_err(), "{bad:?}");
        }
        assert_eq!(overhead(&wg), 80);
    }
}
