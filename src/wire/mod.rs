//! IPv4, TCP, UDP and ICMP wire code: a checked zero-copy view over a packet
//! buffer, TTL decrement with an incremental checksum update, header setters
//! and checksum fill for the offload code, small TCP/UDP header views, the
//! encapsulation's sizes as named constants, and the ICMP error builder.
//! Pure and fuzzed; no accessor can panic after `new_checked`.

use std::net::Ipv4Addr;

mod checksum;
pub mod ether;

mod field {
    pub const VER_IHL: usize = 0;
    pub const TOS: usize = 1;
    pub const TOTAL_LEN: std::ops::Range<usize> = 2..4;
    pub const IDENT: std::ops::Range<usize> = 4..6;
    pub const FLAGS_FRAG: std::ops::Range<usize> = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: std::ops::Range<usize> = 10..12;
    pub const SRC: std::ops::Range<usize> = 12..16;
    pub const DST: std::ops::Range<usize> = 16..20;
}

pub const IPV4_MIN_HEADER: usize = 20;
pub const IPV4_MAX_HEADER: usize = 60;
pub const UDP_HEADER: usize = 8;
pub const TCP_MIN_HEADER: usize = 20;
pub const TCP_MAX_HEADER: usize = 60;
/// Longest IPv4 + TCP header: the most header bytes one segment needs.
pub const MAX_HEADER_LEN: usize = IPV4_MAX_HEADER + TCP_MAX_HEADER;
/// Largest IPv4 packet.
pub const MAX_PACKET: usize = 65535;
/// What the udp backend adds in front of each packet on the underlay: an
/// IPv4 header without options and a UDP header. The TUN's MTU is the
/// underlay's less this.
pub const ENCAP_OVERHEAD: usize = IPV4_MIN_HEADER + UDP_HEADER;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Why a buffer is not a well-formed IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("shorter than an IPv4 header")]
    Truncated,
    #[error("not IPv4")]
    Version,
    #[error("bad header length")]
    HeaderLen,
    #[error("total length disagrees with the datagram")]
    TotalLen,
    #[error("bad header checksum")]
    Checksum,
}

/// A view of an IPv4 packet whose header fields have been validated.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4Packet<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Wraps without checks; accessors may panic on short buffers.
    pub fn new_unchecked(buf: T) -> Self {
        Ipv4Packet { buf }
    }

    /// Validates version, header length and that the total length equals
    /// the buffer length (a datagram carries exactly one packet).
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < IPV4_MIN_HEADER {
            return Err(WireError::Truncated);
        }
        if b[field::VER_IHL] >> 4 != 4 {
            return Err(WireError::Version);
        }
        let hl = ((b[field::VER_IHL] & 0x0f) as usize) * 4;
        if hl < IPV4_MIN_HEADER || hl > b.len() {
            return Err(WireError::HeaderLen);
        }
        let total = u16::from_be_bytes([b[2], b[3]]) as usize;
        if total != b.len() {
            return Err(WireError::TotalLen);
        }
        Ok(Ipv4Packet { buf })
    }

    pub fn into_inner(self) -> T {
        self.buf
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_ref()
    }

    pub fn header_len(&self) -> usize {
        ((self.buf.as_ref()[field::VER_IHL] & 0x0f) as usize) * 4
    }

    pub fn total_len(&self) -> usize {
        let b = &self.buf.as_ref()[field::TOTAL_LEN];
        u16::from_be_bytes([b[0], b[1]]) as usize
    }

    pub fn ttl(&self) -> u8 {
        self.buf.as_ref()[field::TTL]
    }

    pub fn protocol(&self) -> u8 {
        self.buf.as_ref()[field::PROTOCOL]
    }

    pub fn checksum(&self) -> u16 {
        let b = &self.buf.as_ref()[field::CHECKSUM];
        u16::from_be_bytes([b[0], b[1]])
    }

    pub fn src(&self) -> Ipv4Addr {
        let b = &self.buf.as_ref()[field::SRC];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    pub fn dst(&self) -> Ipv4Addr {
        let b = &self.buf.as_ref()[field::DST];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// Fragment offset in 8-byte units; non-zero for all but the first fragment.
    pub fn frag_offset(&self) -> u16 {
        let b = &self.buf.as_ref()[field::FLAGS_FRAG];
        u16::from_be_bytes([b[0], b[1]]) & 0x1fff
    }

    pub fn header_checksum_ok(&self) -> bool {
        checksum(&self.buf.as_ref()[..self.header_len()]) == 0
    }

    /// The payload after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    pub fn tos(&self) -> u8 {
        self.buf.as_ref()[field::TOS]
    }

    pub fn ident(&self) -> u16 {
        let b = &self.buf.as_ref()[field::IDENT];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// The flags and fragment offset word (DF, MF, offset).
    pub fn flags_frag(&self) -> u16 {
        let b = &self.buf.as_ref()[field::FLAGS_FRAG];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// A fragment (MF set or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        self.flags_frag() & 0x3fff != 0
    }

    /// Source and destination address bytes (8, for flow comparisons).
    pub fn addrs(&self) -> &[u8] {
        &self.buf.as_ref()[field::SRC.start..field::DST.end]
    }

    /// The TCP/UDP pseudo-header sum for a transport part of `l4_len` bytes.
    pub fn pseudo_sum(&self, l4_len: u16) -> u64 {
        let b = self.buf.as_ref();
        pseudo_header_sum(&b[field::SRC], &b[field::DST], self.protocol(), l4_len)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    pub fn set_total_len(&mut self, len: u16) {
        self.buf.as_mut()[field::TOTAL_LEN].copy_from_slice(&len.to_be_bytes());
    }

    pub fn set_ident(&mut self, id: u16) {
        self.buf.as_mut()[field::IDENT].copy_from_slice(&id.to_be_bytes());
    }

    /// Computes and writes the header checksum over `header_len()` bytes.
    pub fn fill_checksum(&mut self) {
        let hl = self.header_len();
        let b = self.buf.as_mut();
        b[field::CHECKSUM].copy_from_slice(&[0, 0]);
        let ck = checksum(&b[..hl]);
        b[field::CHECKSUM].copy_from_slice(&ck.to_be_bytes());
    }

    /// Decrements the TTL and patches the header checksum incrementally
    /// (RFC 1624), as flannel's proxy does. Returns the new TTL.
    pub fn decrement_ttl(&mut self) -> u8 {
        let b = self.buf.as_mut();
        let old_word = u16::from_be_bytes([b[field::TTL], b[field::PROTOCOL]]);
        let ttl = b[field::TTL].wrapping_sub(1);
        b[field::TTL] = ttl;
        let new_word = u16::from_be_bytes([ttl, b[field::PROTOCOL]]);
        let old_ck = u16::from_be_bytes([b[10], b[11]]);
        let ck = checksum_adjust(old_ck, old_word, new_word);
        b[field::CHECKSUM].copy_from_slice(&ck.to_be_bytes());
        ttl
    }
}

/// The Internet checksum (RFC 1071) of `data`: 0 when verifying a buffer
/// that already holds its checksum.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data, 0))
}

pub use checksum::{sum, sum_reference};

/// Folds a [`sum`] to 16 bits (not complemented).
#[inline]
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The TCP/UDP pseudo-header sum for IPv4 (not folded).
#[inline]
pub fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, len: u16) -> u64 {
    sum(src, 0) + sum(dst, 0) + proto as u64 + len as u64
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m').
pub fn checksum_adjust(old_checksum: u16, old_word: u16, new_word: u16) -> u16 {
    let mut sum = (!old_checksum as u32) + (!old_word as u32) + new_word as u32;
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TCP header flag bits (byte 13).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// A view of a TCP header (the buffer starts at the header; the caller
/// has checked it holds [`TCP_MIN_HEADER`] bytes, and `header_len()` bytes
/// before using the options).
#[derive(Debug)]
pub struct TcpHeader<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> TcpHeader<T> {
    /// Byte offset of the checksum field in the TCP header.
    pub const CHECKSUM_AT: usize = 16;

    pub fn new_unchecked(buf: T) -> Self {
        TcpHeader { buf }
    }

    pub fn ports(&self) -> &[u8] {
        &self.buf.as_ref()[0..4]
    }

    pub fn seq(&self) -> u32 {
        let b = self.buf.as_ref();
        u32::from_be_bytes([b[4], b[5], b[6], b[7]])
    }

    /// The data offset in bytes.
    pub fn header_len(&self) -> usize {
        ((self.buf.as_ref()[12] >> 4) as usize) * 4
    }

    pub fn flags(&self) -> u8 {
        self.buf.as_ref()[13]
    }

    /// Ack number and data offset: what must match for segments to coalesce.
    pub fn ack_and_offset(&self) -> &[u8] {
        &self.buf.as_ref()[8..13]
    }

    pub fn window(&self) -> &[u8] {
        &self.buf.as_ref()[14..16]
    }

    pub fn options(&self) -> &[u8] {
        &self.buf.as_ref()[TCP_MIN_HEADER..self.header_len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpHeader<T> {
    pub fn set_seq(&mut self, seq: u32) {
        self.buf.as_mut()[4..8].copy_from_slice(&seq.to_be_bytes());
    }

    pub fn set_flags(&mut self, flags: u8) {
        self.buf.as_mut()[13] = flags;
    }

    pub fn set_checksum(&mut self, ck: u16) {
        let at = Self::CHECKSUM_AT;
        self.buf.as_mut()[at..at + 2].copy_from_slice(&ck.to_be_bytes());
    }

    /// Fills the checksum over this header and `payload`, which follows it
    /// on the wire, given the pseudo-header sum.
    pub fn fill_checksum(&mut self, pseudo: u64, payload: &[u8]) {
        self.set_checksum(0);
        let ck = !fold(sum(payload, sum(self.buf.as_ref(), pseudo)));
        self.set_checksum(ck);
    }
}

/// A view of a UDP header (8 bytes; the caller has checked the length).
#[derive(Debug)]
pub struct UdpHeader<T> {
    buf: T,
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpHeader<T> {
    pub fn new_unchecked(buf: T) -> Self {
        UdpHeader { buf }
    }

    pub fn set_len(&mut self, len: u16) {
        self.buf.as_mut()[4..6].copy_from_slice(&len.to_be_bytes());
    }

    /// Fills the checksum over this header and `payload`, given the
    /// pseudo-header sum. A computed 0 is sent as 0xffff (0 means "no
    /// checksum" in UDP over IPv4).
    pub fn fill_checksum(&mut self, pseudo: u64, payload: &[u8]) {
        let b = self.buf.as_mut();
        b[6..8].copy_from_slice(&[0, 0]);
        let ck = !fold(sum(payload, sum(&b[..UDP_HEADER], pseudo)));
        let ck = if ck == 0 { 0xffff } else { ck };
        b[6..8].copy_from_slice(&ck.to_be_bytes());
    }
}

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_NET_UNREACH: u8 = 0;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_EXC_TTL: u8 = 0;
/// TTL of the ICMP errors we generate (flannel uses 8).
pub const ICMP_ERROR_TTL: u8 = 8;
/// Bytes an ICMP error we build can take: IPv4 20 + ICMP 8 + up to 60 + 8 quoted.
pub const ICMP_ERROR_MAX: usize = 20 + 8 + 60 + 8;

/// An IPv4 header without options, to emit (smoltcp's `Ipv4Repr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Repr {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub ttl: u8,
    pub ident: u16,
    pub dont_frag: bool,
    /// Bytes after the header.
    pub payload_len: usize,
}

impl Ipv4Repr {
    /// Writes the 20-byte header, checksum filled, into `out[..20]`.
    pub fn emit(&self, out: &mut [u8]) {
        let h = &mut out[..IPV4_MIN_HEADER];
        h.fill(0);
        h[field::VER_IHL] = 0x45;
        h[field::TOTAL_LEN]
            .copy_from_slice(&((IPV4_MIN_HEADER + self.payload_len) as u16).to_be_bytes());
        h[field::IDENT].copy_from_slice(&self.ident.to_be_bytes());
        h[field::FLAGS_FRAG]
            .copy_from_slice(&(if self.dont_frag { 0x4000u16 } else { 0 }).to_be_bytes());
        h[field::TTL] = self.ttl;
        h[field::PROTOCOL] = self.protocol;
        h[field::SRC].copy_from_slice(&self.src.octets());
        h[field::DST].copy_from_slice(&self.dst.octets());
        Ipv4Packet::new_unchecked(h).fill_checksum();
    }
}

/// An ICMP error message (destination unreachable, time exceeded), to emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpErrorRepr {
    pub icmp_type: u8,
    pub code: u8,
}

impl IcmpErrorRepr {
    /// Writes the 8-byte ICMP header and `quoted` (the offender's header
    /// and first bytes) into `out`, checksum filled.
    pub fn emit(&self, quoted: &[u8], out: &mut [u8]) {
        let m = &mut out[..8 + quoted.len()];
        m[..8].copy_from_slice(&[self.icmp_type, self.code, 0, 0, 0, 0, 0, 0]);
        m[8..].copy_from_slice(quoted);
        let ck = checksum(m);
        m[2..4].copy_from_slice(&ck.to_be_bytes());
    }
}

/// Whether an ICMP error may be sent about `offender` (RFC 1122 3.2.2):
/// never about an ICMP error, a non-first fragment, or a packet whose source
/// is not a single host.
pub fn may_send_icmp_error<T: AsRef<[u8]>>(offender: &Ipv4Packet<T>) -> bool {
    if offender.frag_offset() != 0 {
        return false;
    }
    let src = offender.src();
    if src.is_unspecified() || src.is_broadcast() || src.is_multicast() || src.is_loopback() {
        return false;
    }
    let dst = offender.dst();
    if dst.is_broadcast() || dst.is_multicast() {
        return false;
    }
    if offender.protocol() == PROTO_ICMP {
        // Queries (echo, timestamp, …) may get an error; errors may not.
        match offender.payload().first() {
            Some(&t) => !matches!(t, 3 | 4 | 5 | 11 | 12),
            None => false,
        }
    } else {
        true
    }
}

/// Writes an ICMP error (`icmp_type`/`code`) about `offender` into `out`,
/// sourced from `src`, quoting the offender's header and 8 bytes of payload.
/// Returns its length, or `None` when no error may be sent or `out` is short.
pub fn build_icmp_error<T: AsRef<[u8]>>(
    offender: &Ipv4Packet<T>,
    icmp_type: u8,
    code: u8,
    src: Ipv4Addr,
    out: &mut [u8],
) -> Option<usize> {
    if !may_send_icmp_error(offender) {
        return None;
    }
    let quoted = (offender.header_len() + 8).min(offender.as_bytes().len());
    let len = 20 + 8 + quoted;
    if out.len() < len {
        return None;
    }
    let out = &mut out[..len];
    Ipv4Repr {
        src,
        dst: offender.src(),
        protocol: PROTO_ICMP,
        ttl: ICMP_ERROR_TTL,
        ident: 0,
        dont_frag: true,
        payload_len: 8 + quoted,
    }
    .emit(out);
    IcmpErrorRepr { icmp_type, code }.emit(&offender.as_bytes()[..quoted], &mut out[20..]);
    Some(len)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid IPv4/UDP packet for tests.
    pub fn udp_packet(src: [u8; 4], dst: [u8; 4], ttl: u8, payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[8] = ttl;
        p[9] = PROTO_UDP;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let ck = checksum(&p[..20]);
        p[10..12].copy_from_slice(&ck.to_be_bytes());
        p[20..22].copy_from_slice(&4000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5000u16.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        p
    }

    #[test]
    fn checksum_known_vector() {
        // RFC 1071 example words sum.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
        // Odd length pads with a zero byte.
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn checked_view_rejects_malformed() {
        let good = udp_packet([10, 5, 1, 2], [10, 5, 2, 3], 64, b"hi");
        assert!(Ipv4Packet::new_checked(&good[..]).is_ok());
        assert_eq!(
            Ipv4Packet::new_checked(&good[..19]).unwrap_err(),
            WireError::Truncated
        );
        let mut v6 = good.clone();
        v6[0] = 0x65;
        assert_eq!(
            Ipv4Packet::new_checked(&v6[..]).unwrap_err(),
            WireError::Version
        );
        let mut ihl = good.clone();
        ihl[0] = 0x44;
        assert_eq!(
            Ipv4Packet::new_checked(&ihl[..]).unwrap_err(),
            WireError::HeaderLen
        );
        ihl[0] = 0x4f;
        assert_eq!(
            Ipv4Packet::new_checked(&ihl[..22]).unwrap_err(),
            WireError::HeaderLen
        );
        let mut liar = good.clone();
        liar[3] += 1;
        assert_eq!(
            Ipv4Packet::new_checked(&liar[..]).unwrap_err(),
            WireError::TotalLen
        );
        assert_eq!(
            Ipv4Packet::new_checked(&good[..25]).unwrap_err(),
            WireError::TotalLen
        );
    }

    #[test]
    fn ttl_decrement_keeps_checksum_valid() {
        for ttl in [1u8, 2, 64, 255] {
            let mut p = udp_packet([10, 5, 1, 2], [10, 5, 2, 3], ttl, b"payload");
            let mut v = Ipv4Packet::new_checked(&mut p[..]).unwrap();
            assert_eq!(v.decrement_ttl(), ttl - 1);
            assert!(v.header_checksum_ok(), "ttl {ttl}");
            assert_eq!(v.ttl(), ttl - 1);
        }
    }

    #[test]
    fn setters_and_checksum_fills_give_valid_headers() {
        let mut p = udp_packet([10, 5, 1, 2], [10, 5, 2, 3], 64, b"payload!");
        let mut ip = Ipv4Packet::new_unchecked(&mut p[..IPV4_MIN_HEADER]);
        ip.set_ident(0xbeef);
        ip.set_total_len(36);
        ip.fill_checksum();
        assert!(ip.header_checksum_ok());
        assert_eq!((ip.ident(), ip.total_len()), (0xbeef, 36));
        let pseudo = ip.pseudo_sum(16);
        let (h, rest) = p[IPV4_MIN_HEADER..].split_at_mut(UDP_HEADER);
        let mut u = UdpHeader::new_unchecked(&mut *h);
        u.set_len(16);
        u.fill_checksum(pseudo, rest);
        // A filled checksum verifies: the sum over everything folds to 0xffff.
        assert_eq!(fold(sum(rest, sum(h, pseudo))), 0xffff);

        // TCP: 20-byte header, sequence and flags set, checksum verifies.
        let mut t = [0u8; 24];
        t[12] = 5 << 4;
        let mut th = TcpHeader::new_unchecked(&mut t[..20]);
        th.set_seq(0x0102_0304);
        th.set_flags(tcp_flags::ACK | tcp_flags::PSH);
        assert_eq!((th.seq(), th.header_len()), (0x0102_0304, 20));
        let data = b"data";
        th.fill_checksum(7, data);
        assert_eq!(fold(sum(data, sum(&t[..20], 7))), 0xffff);
        assert_eq!(ENCAP_OVERHEAD, 28);
        assert_eq!(MAX_HEADER_LEN, 120);
    }

    #[test]
    fn icmp_net_unreachable_quotes_header_and_8_bytes() {
        let p = udp_packet([10, 5, 1, 2], [10, 5, 9, 3], 63, b"0123456789abcdef");
        let v = Ipv4Packet::new_checked(&p[..]).unwrap();
        let mut out = [0u8; ICMP_ERROR_MAX];
        let n = build_icmp_error(
            &v,
            ICMP_DEST_UNREACH,
            ICMP_NET_UNREACH,
            Ipv4Addr::new(10, 5, 0, 0),
            &mut out,
        )
        .unwrap();
        assert_eq!(n, 20 + 8 + 28);
        let r = Ipv4Packet::new_checked(&out[..n]).unwrap();
        assert!(r.header_checksum_ok());
        assert_eq!(r.ttl(), 8);
        assert_eq!(r.protocol(), PROTO_ICMP);
        assert_eq!(r.src(), Ipv4Addr::new(10, 5, 0, 0));
        assert_eq!(r.dst(), Ipv4Addr::new(10, 5, 1, 2));
        let icmp = r.payload();
        assert_eq!((icmp[0], icmp[1]), (3, 0));
        assert_eq!(checksum(icmp), 0);
        assert_eq!(&icmp[8..], &p[..28]);
    }

    #[test]
    fn no_icmp_error_about_errors_fragments_or_broadcasts() {
        let mut out = [0u8; ICMP_ERROR_MAX];
        let src = Ipv4Addr::new(10, 5, 0, 0);
        // An ICMP error (type 3) as offender.
        let mut p = udp_packet([10, 5, 1, 2], [10, 5, 9, 3], 63, b"xxxxxxxx");
        p[9] = PROTO_ICMP;
        p[20] = 3;
        let v = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert_eq!(build_icmp_error(&v, 3, 0, src, &mut out), None);
        // An echo request is a query: an error is fine.
        p[20] = 8;
        let v = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert!(build_icmp_error(&v, 3, 0, src, &mut out).is_some());
        // Non-first fragment.
        let mut f = udp_packet([10, 5, 1, 2], [10, 5, 9, 3], 63, b"x");
        f[7] = 1;
        let v = Ipv4Packet::new_checked(&f[..]).unwrap();
        assert_eq!(build_icmp_error(&v, 3, 0, src, &mut out), None);
        // Broadcast destination, unspecified source.
        let b = udp_packet([10, 5, 1, 2], [255, 255, 255, 255], 63, b"x");
        assert_eq!(
            build_icmp_error(
                &Ipv4Packet::new_checked(&b[..]).unwrap(),
                3,
                0,
                src,
                &mut out
            ),
            None
        );
        let z = udp_packet([0, 0, 0, 0], [10, 5, 9, 3], 63, b"x");
        assert_eq!(
            build_icmp_error(
                &Ipv4Packet::new_checked(&z[..]).unwrap(),
                3,
                0,
                src,
                &mut out
            ),
            None
        );
        // Output too short.
        let ok = udp_packet([10, 5, 1, 2], [10, 5, 9, 3], 63, b"x");
        assert_eq!(
            build_icmp_error(
                &Ipv4Packet::new_checked(&ok[..]).unwrap(),
                3,
                0,
                src,
                &mut out[..20]
            ),
            None
        );
    }

    #[test]
    fn short_offender_is_quoted_whole() {
        let p = udp_packet([10, 5, 1, 2], [10, 5, 9, 3], 63, b"");
        let v = Ipv4Packet::new_checked(&p[..]).unwrap();
        let mut out = [0u8; ICMP_ERROR_MAX];
        let n = build_icmp_error(&v, 3, 0, Ipv4Addr::new(10, 5, 0, 0), &mut out).unwrap();
        assert_eq!(n, 20 + 8 + 28);
    }

    proptest::proptest! {
        #[test]
        fn incremental_update_equals_full_recompute(hdr in proptest::collection::vec(proptest::prelude::any::<u8>(), 20), ttl in 1u8..=255) {
            let mut p = hdr.clone();
            p[0] = 0x45;
            p[2..4].copy_from_slice(&20u16.to_be_bytes());
            p[8] = ttl;
            p[10] = 0; p[11] = 0;
            let ck = checksum(&p);
            p[10..12].copy_from_slice(&ck.to_be_bytes());
            let mut v = Ipv4Packet::new_checked(&mut p[..]).unwrap();
            v.decrement_ttl();
            proptest::prop_assert!(v.header_checksum_ok());
        }
    }
}
