//! VXLAN (RFC 7348), Ethernet II and ARP (RFC 826, IPv4 over Ethernet):
//! what the vxlan backend puts in front of an IPv4 packet and answers.
//! Views in the style of the IPv4 one: `new_checked` validates the length
//! once, so no accessor panics; a `Repr` emits.

use std::fmt;
use std::net::Ipv4Addr;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// A random locally administered unicast address (as the kernel gives
    /// a vxlan device).
    pub fn random(rng: &mut impl rand::Rng) -> Mac {
        let mut b: [u8; 6] = rng.gen();
        b[0] = (b[0] & 0xfe) | 0x02;
        Mac(b)
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (six hex octets separated by ':' or '-')")]
pub struct BadMac(pub String);

impl std::str::FromStr for Mac {
    type Err = BadMac;

    /// Six two-digit hex octets separated by `:` or `-` (what Go's
    /// `net.ParseMAC` accepts for 48-bit addresses, less the dotted form).
    fn from_str(s: &str) -> Result<Self, BadMac> {
        let bad = || BadMac(s.chars().take(40).collect());
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut parts = s.split(sep);
        for o in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

/// Why a buffer is not a frame of the kind asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("shorter than its header")]
    Truncated,
    #[error("VXLAN flags without the valid-VNI bit")]
    VxlanFlags,
}

pub const VXLAN_HEADER: usize = 8;
pub const ETHERNET_HEADER: usize = 14;
/// What the vxlan backend puts before each IPv4 packet inside the UDP
/// datagram: the VXLAN header and an Ethernet header.
pub const VXLAN_PREFIX: usize = VXLAN_HEADER + ETHERNET_HEADER;
/// The vxlan backend's overhead on the underlay: outer IPv4 + UDP + the
/// prefix (flannel's `encapOverhead`).
pub const VXLAN_OVERHEAD: usize = super::IPV4_MIN_HEADER + super::UDP_HEADER + VXLAN_PREFIX;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// The "I" flag: the VNI field is valid (RFC 7348 §5).
pub const VXLAN_FLAG_VNI: u8 = 0x08;

/// A VXLAN header followed by its inner frame.
#[derive(Debug, Clone, Copy)]
pub struct VxlanPacket<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> VxlanPacket<T> {
    /// A view of a buffer that holds at least the header and whose flags
    /// say the VNI is valid. Reserved bits are ignored, as the RFC asks.
    pub fn new_checked(buf: T) -> Result<Self, FrameError> {
        let b = buf.as_ref();
        if b.len() < VXLAN_HEADER {
            return Err(FrameError::Truncated);
        }
        if b[0] & VXLAN_FLAG_VNI == 0 {
            return Err(FrameError::VxlanFlags);
        }
        Ok(VxlanPacket { buf })
    }

    pub fn vni(&self) -> u32 {
        let b = self.buf.as_ref();
        u32::from_be_bytes([0, b[4], b[5], b[6]])
    }

    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[VXLAN_HEADER..]
    }
}

/// A VXLAN header to emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanRepr {
    pub vni: u32,
}

impl VxlanRepr {
    /// Writes the 8 header bytes into `out[..8]`.
    pub fn emit(&self, out: &mut [u8]) {
        let v = self.vni.to_be_bytes();
        out[..VXLAN_HEADER].copy_from_slice(&[VXLAN_FLAG_VNI, 0, 0, 0, v[1], v[2], v[3], 0]);
    }
}

/// An Ethernet II frame.
#[derive(Debug, Clone, Copy)]
pub struct EthernetFrame<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    pub fn new_checked(buf: T) -> Result<Self, FrameError> {
        if buf.as_ref().len() < ETHERNET_HEADER {
            return Err(FrameError::Truncated);
        }
        Ok(EthernetFrame { buf })
    }

    pub fn dst(&self) -> Mac {
        Mac(self.buf.as_ref()[0..6].try_into().expect("checked length"))
    }

    pub fn src(&self) -> Mac {
        Mac(self.buf.as_ref()[6..12].try_into().expect("checked length"))
    }

    pub fn ethertype(&self) -> u16 {
        let b = self.buf.as_ref();
        u16::from_be_bytes([b[12], b[13]])
    }

    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[ETHERNET_HEADER..]
    }
}

/// An Ethernet header to emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetRepr {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: u16,
}

impl EthernetRepr {
    /// Writes the 14 header bytes into `out[..14]`.
    pub fn emit(&self, out: &mut [u8]) {
        out[0..6].copy_from_slice(&self.dst.0);
        out[6..12].copy_from_slice(&self.src.0);
        out[12..14].copy_from_slice(&self.ethertype.to_be_bytes());
    }
}

/// The 22-byte prefix of a VXLAN datagram carrying an IPv4 packet from
/// `src` to `dst`.
pub fn vxlan_prefix(vni: u32, dst: Mac, src: Mac) -> [u8; VXLAN_PREFIX] {
    let mut p = [0u8; VXLAN_PREFIX];
    VxlanRepr { vni }.emit(&mut p);
    EthernetRepr {
        dst,
        src,
        ethertype: ETHERTYPE_IPV4,
    }
    .emit(&mut p[VXLAN_HEADER..]);
    p
}

/// ARP for IPv4 over Ethernet: 28 bytes.
pub const ARP_LEN: usize = 28;
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

/// An ARP packet for IPv4 over Ethernet (hardware type 1, protocol 0x0800,
/// address lengths 6 and 4); anything else is not parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpRepr {
    pub op: u16,
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_mac: Mac,
    pub target_ip: Ipv4Addr,
}

impl ArpRepr {
    pub fn parse(b: &[u8]) -> Option<ArpRepr> {
        if b.len() < ARP_LEN || b[0..6] != [0, 1, 0x08, 0x00, 6, 4] {
            return None;
        }
        let ip = |r: std::ops::Range<usize>| {
            Ipv4Addr::from(<[u8; 4]>::try_from(&b[r]).expect("4 bytes"))
        };
        let mac = |r: std::ops::Range<usize>| Mac(b[r].try_into().expect("6 bytes"));
        Some(ArpRepr {
            op: u16::from_be_bytes([b[6], b[7]]),
            sender_mac: mac(8..14),
            sender_ip: ip(14..18),
            target_mac: mac(18..24),
            target_ip: ip(24..28),
        })
    }

    pub fn emit(&self, out: &mut [u8]) {
        out[0..6].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
        out[6..8].copy_from_slice(&self.op.to_be_bytes());
        out[8..14].copy_from_slice(&self.sender_mac.0);
        out[14..18].copy_from_slice(&self.sender_ip.octets());
        out[18..24].copy_from_slice(&self.target_mac.0);
        out[24..28].copy_from_slice(&self.target_ip.octets());
    }

    /// The reply to this request from the owner of `mac`.
    pub fn reply(&self, mac: Mac) -> ArpRepr {
        ArpRepr {
            op: ARP_REPLY,
            sender_mac: mac,
            sender_ip: self.target_ip,
            target_mac: self.sender_mac,
            target_ip: self.sender_ip,
        }
    }
}

/// Bytes of a whole VXLAN datagram carrying an ARP packet.
pub const VXLAN_ARP_LEN: usize = VXLAN_PREFIX + ARP_LEN;

/// Builds a whole VXLAN datagram carrying `arp` from `src` to `dst`.
pub fn vxlan_arp(vni: u32, dst: Mac, src: Mac, arp: &ArpRepr) -> [u8; VXLAN_ARP_LEN] {
    let mut out = [0u8; VXLAN_ARP_LEN];
    VxlanRepr { vni }.emit(&mut out);
    EthernetRepr {
        dst,
        src,
        ethertype: ETHERTYPE_ARP,
    }
    .emit(&mut out[VXLAN_HEADER..]);
    arp.emit(&mut out[VXLAN_PREFIX..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_like_go_and_print_lower_case() {
        let m: Mac = "0A:1b:2c:3d:4e:5F".parse().unwrap();
        assert_eq!(m.0, [0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]);
        assert_eq!(m.to_string(), "0a:1b:2c:3d:4e:5f");
        assert_eq!("0a-1b-2c-3d-4e-5f".parse::<Mac>().unwrap(), m);
        for bad in [
            "",
            "0a:1b:2c:3d:4e",
            "0a:1b:2c:3d:4e:5f:60",
            "0a:1b:2c:3d:4e:zz",
            "a:1b:2c:3d:4e:5f0",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        let r = Mac::random(&mut rand::thread_rng());
        assert!(r.is_unicast() && r.0[0] & 2 == 2, "{r}");
    }

    #[test]
    fn the_prefix_is_what_the_kernel_sends() {
        // As `tcpdump -x` shows a kernel vxlan frame with VNI 7.
        let dst = Mac([0x02, 0, 0, 0, 0, 0xbb]);
        let src = Mac([0x02, 0, 0, 0, 0, 0xaa]);
        let p = vxlan_prefix(7, dst, src);
        assert_eq!(
            p,
            [
                0x08, 0, 0, 0, 0, 0, 7, 0, // VXLAN
                0x02, 0, 0, 0, 0, 0xbb, 0x02, 0, 0, 0, 0, 0xaa, 0x08, 0x00
            ]
        );
        let v = VxlanPacket::new_checked(&p[..]).unwrap();
        assert_eq!(v.vni(), 7);
        let e = EthernetFrame::new_checked(v.payload()).unwrap();
        assert_eq!(
            (e.dst(), e.src(), e.ethertype()),
            (dst, src, ETHERTYPE_IPV4)
        );
        assert_eq!(
            VxlanPacket::new_checked(&[0u8; 8][..]).unwrap_err(),
            FrameError::VxlanFlags
        );
        assert_eq!(
            VxlanPacket::new_checked(&p[..7]).unwrap_err(),
            FrameError::Truncated
        );
        assert!(EthernetFrame::new_checked(&p[8..21]).is_err());
        assert_eq!(VxlanRepr { vni: 0xabcdef }.vni, 0xabcdef);
        let mut h = [0u8; 8];
        VxlanRepr { vni: 0xabcdef }.emit(&mut h);
        assert_eq!(VxlanPacket::new_checked(&h[..]).unwrap().vni(), 0xabcdef);
    }

    #[test]
    fn an_arp_request_round_trips_and_is_answered() {
        let req = ArpRepr {
            op: ARP_REQUEST,
            sender_mac: Mac([2, 0, 0, 0, 0, 1]),
            sender_ip: Ipv4Addr::new(10, 5, 1, 0),
            target_mac: Mac([0; 6]),
            target_ip: Ipv4Addr::new(10, 5, 2, 0),
        };
        let d = vxlan_arp(1, Mac::BROADCAST, req.sender_mac, &req);
        let v = VxlanPacket::new_checked(&d[..]).unwrap();
        let e = EthernetFrame::new_checked(v.payload()).unwrap();
        assert_eq!(e.ethertype(), ETHERTYPE_ARP);
        assert_eq!(ArpRepr::parse(e.payload()), Some(req));
        let me = Mac([2, 0, 0, 0, 0, 2]);
        let r = req.reply(me);
        assert_eq!(
            (r.op, r.sender_mac, r.sender_ip, r.target_mac, r.target_ip),
            (ARP_REPLY, me, req.target_ip, req.sender_mac, req.sender_ip)
        );
        // Not IPv4-over-Ethernet, or short: not parsed.
        let mut other = [0u8; ARP_LEN];
        req.emit(&mut other);
        other[1] = 6;
        assert_eq!(ArpRepr::parse(&other), None);
        assert_eq!(ArpRepr::parse(&d[VXLAN_PREFIX..VXLAN_ARP_LEN - 1]), None);
    }
}
