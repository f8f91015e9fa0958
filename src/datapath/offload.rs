//! TUN offloads without I/O: the `virtio_net_hdr` the kernel puts in front
//! of each packet on an `IFF_VNET_HDR` TUN, splitting TCP/UDP super-packets
//! (TSO/USO) into MTU-sized IPv4 packets laid out back to back for one UDP
//! GSO send, and coalescing consecutive in-order TCP segments of one flow
//! into a super-packet for one TUN write (GRO in userspace).
//!
//! Offloads are local to this host: every datagram on the wire is still one
//! ordinary IPv4 packet with correct checksums.

use crate::wire::tcp_flags::{ACK, CWR, ECE, FIN, PSH, RST, SYN, URG};
pub use crate::wire::MAX_PACKET;
use crate::wire::{
    fold, sum, Ipv4Packet, TcpHeader, UdpHeader, IPV4_MIN_HEADER, MAX_HEADER_LEN, PROTO_TCP,
    PROTO_UDP, TCP_MAX_HEADER, TCP_MIN_HEADER, UDP_HEADER,
};

pub const VNET_HDR_LEN: usize = 10;
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;
/// The most segments one UDP GSO send may carry (the kernel's UDP_MAX_SEGMENTS).
pub const MAX_GSO_SEGMENTS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("shorter than a virtio_net_hdr")]
    ShortHeader,
    #[error("unsupported GSO type {0}")]
    GsoType(u8),
    #[error("super-packet headers are inconsistent")]
    BadPacket,
    #[error("output buffer too small")]
    NoRoom,
}

/// `struct virtio_net_hdr` (legacy layout, host byte order as the TUN uses
/// it without TUNSETVNETLE/BE).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn decode(b: &[u8]) -> Result<Self, OffloadError> {
        if b.len() < VNET_HDR_LEN {
            return Err(OffloadError::ShortHeader);
        }
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Ok(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn encode(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

/// Completes a CHECKSUM_PARTIAL packet (`F_NEEDS_CSUM`, no GSO): the field
/// at `csum_start + csum_offset` holds the pseudo-header sum; add the rest.
pub fn complete_checksum(pkt: &mut [u8], hdr: &VnetHdr) -> Result<(), OffloadError> {
    let start = hdr.csum_start as usize;
    let at = start + hdr.csum_offset as usize;
    if at + 2 > pkt.len() {
        return Err(OffloadError::BadPacket);
    }
    let initial = u16::from_be_bytes([pkt[at], pkt[at + 1]]) as u64;
    pkt[at] = 0;
    pkt[at + 1] = 0;
    let ck = !fold(sum(&pkt[start..], initial));
    pkt[at..at + 2].copy_from_slice(&ck.to_be_bytes());
    Ok(())
}

/// The segments of a super-packet, described without copying its payload:
/// segment `k` is `headers[k * hlen..(k + 1) * hlen]` followed by
/// `pkt[hlen + k * gso..]` (at most `gso` bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitPlan {
    pub count: usize,
    /// IPv4 + transport header length of each segment.
    pub hlen: usize,
    /// Payload bytes per segment (the last may have fewer).
    pub gso: usize,
    /// Payload bytes of the whole super-packet.
    pub payload: usize,
    /// IPv4 header length.
    pub iph: usize,
    /// TCP (TSO) rather than UDP (USO).
    pub tcp: bool,
}

impl SplitPlan {
    /// Payload range of segment `k` within the super-packet.
    pub fn data(&self, k: usize) -> std::ops::Range<usize> {
        let s = self.hlen + k * self.gso;
        s..(s + self.gso).min(self.hlen + self.payload)
    }

    pub fn seg_len(&self) -> usize {
        self.hlen + self.gso
    }

    pub fn total(&self) -> usize {
        self.payload + self.count * self.hlen
    }
}

/// Validates an IPv4 TCP (TSO) or UDP (USO) super-packet, as read from the
/// TUN after its vnet header, and plans its segments. A super-packet may
/// have any number of segments (a small MSS gives over a thousand): the
/// headers are then written a range at a time ([`write_split_headers`]).
pub fn split_plan(pkt: &[u8], hdr: &VnetHdr) -> Result<SplitPlan, OffloadError> {
    let bad = OffloadError::BadPacket;
    if pkt.len() < IPV4_MIN_HEADER || pkt[0] >> 4 != 4 {
        return Err(bad);
    }
    let ip = Ipv4Packet::new_unchecked(pkt);
    let iph = ip.header_len();
    let tcp = match hdr.gso_type & !GSO_ECN {
        GSO_TCPV4 if ip.protocol() == PROTO_TCP => true,
        GSO_UDP_L4 if ip.protocol() == PROTO_UDP => false,
        t => return Err(OffloadError::GsoType(t)),
    };
    if iph < IPV4_MIN_HEADER || hdr.csum_start as usize != iph {
        return Err(bad);
    }
    // Do not trust hdr_len (it can cover the whole first packet on the
    // forwarding path): derive it from the transport header.
    let th = if tcp {
        if pkt.len() < iph + TCP_MIN_HEADER {
            return Err(bad);
        }
        let l = TcpHeader::new_unchecked(&pkt[iph..]).header_len();
        if !(TCP_MIN_HEADER..=TCP_MAX_HEADER).contains(&l) {
            return Err(bad);
        }
        l
    } else {
        UDP_HEADER
    };
    let hlen = iph + th;
    let gso = hdr.gso_size as usize;
    if gso == 0 || pkt.len() < hlen {
        return Err(bad);
    }
    let payload = pkt.len() - hlen;
    Ok(SplitPlan {
        count: payload.div_ceil(gso).max(1),
        hlen,
        gso,
        payload,
        iph,
        tcp,
    })
}

/// Writes the headers of segments `segs` of a planned super-packet into
/// `out` (`hlen` bytes each, segment `segs.start` first): IP total length,
/// id and header checksum, TCP sequence numbers and flags (FIN/PSH only on
/// the last, CWR only on the first), UDP lengths, and each segment's
/// transport checksum over its payload, which stays where it is in `pkt`.
pub fn write_split_headers(
    pkt: &[u8],
    plan: &SplitPlan,
    segs: std::ops::Range<usize>,
    out: &mut [u8],
) -> Result<(), OffloadError> {
    let hlen = plan.hlen;
    if segs.end > plan.count || out.len() < segs.len() * hlen {
        return Err(OffloadError::NoRoom);
    }
    let (iph, gso) = (plan.iph, plan.gso);
    let th = hlen - iph;
    let id = Ipv4Packet::new_unchecked(pkt).ident();
    let seq = TcpHeader::new_unchecked(&pkt[iph..]).seq();
    for (j, k) in segs.enumerate() {
        let data = &pkt[plan.data(k)];
        let o = &mut out[j * hlen..(j + 1) * hlen];
        o.copy_from_slice(&pkt[..hlen]);
        let (ip, t) = o.split_at_mut(iph);
        let mut ip = Ipv4Packet::new_unchecked(ip);
        ip.set_total_len((hlen + data.len()) as u16);
        ip.set_ident(id.wrapping_add(k as u16));
        ip.fill_checksum();
        let pseudo = ip.pseudo_sum((th + data.len()) as u16);
        if plan.tcp {
            let mut t = TcpHeader::new_unchecked(t);
            t.set_seq(seq.wrapping_add((k * gso) as u32));
            let mut flags = t.flags();
            if k + 1 != plan.count {
                flags &= !(FIN | PSH);
            }
            if k != 0 {
                flags &= !CWR;
            }
            t.set_flags(flags);
            t.fill_checksum(pseudo, data);
        } else {
            let mut u = UdpHeader::new_unchecked(t);
            u.set_len((th + data.len()) as u16);
            u.fill_checksum(pseudo, data);
        }
    }
    Ok(())
}

/// What one packet read from the TUN becomes on the wire: a plain packet
/// is one segment sent as it is; a TSO/USO super-packet is cut into
/// segments, each a header built apart followed by its slice of the
/// payload. The TUN → UDP loop walks this, a chunk of segments at a time,
/// whatever the packet was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segments {
    /// The packet as it is (`len` bytes).
    Whole(usize),
    /// A super-packet's segments.
    Split(SplitPlan),
}

/// One piece of a segment: header bytes built in the header area (offset
/// relative to where its chunk's headers start, length), or payload bytes
/// of the packet read (a range in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentPiece {
    Header(usize, usize),
    Payload(std::ops::Range<usize>),
}

impl Segments {
    /// The segments of `pkt` as its vnet header describes it (no vnet
    /// header, or `GSO_NONE`: the packet whole).
    pub fn of(pkt: &[u8], hdr: &VnetHdr) -> Result<Self, OffloadError> {
        if hdr.gso_type == GSO_NONE {
            Ok(Segments::Whole(pkt.len()))
        } else {
            split_plan(pkt, hdr).map(Segments::Split)
        }
    }

    /// These segments cut so that each is at most `max` bytes (IP header
    /// included), for a path whose MTU is below the segment size. Only a
    /// TCP super-packet is cut finer (TCP may segment anywhere; UDP
    /// datagram boundaries are the application's); anything else, or a
    /// `max` that leaves no payload, is returned as it is.
    pub fn fit(self, max: usize) -> Self {
        match self {
            Segments::Split(p) if p.tcp && p.seg_len() > max && max > p.hlen => {
                let gso = max - p.hlen;
                Segments::Split(SplitPlan {
                    count: p.payload.div_ceil(gso).max(1),
                    gso,
                    ..p
                })
            }
            s => s,
        }
    }

    pub fn count(&self) -> usize {
        match self {
            Segments::Whole(_) => 1,
            Segments::Split(p) => p.count,
        }
    }

    /// Bytes sent in all.
    pub fn total(&self) -> usize {
        match self {
            Segments::Whole(len) => *len,
            Segments::Split(p) => p.total(),
        }
    }

    /// The UDP GSO segment size (every segment's length but the last's).
    pub fn seg_len(&self) -> usize {
        match self {
            Segments::Whole(len) => *len,
            Segments::Split(p) => p.seg_len(),
        }
    }

    /// Header bytes `n` segments need built.
    pub fn header_bytes(&self, n: usize) -> usize {
        match self {
            Segments::Whole(_) => 0,
            Segments::Split(p) => n * p.hlen,
        }
    }

    /// Pieces (iovecs) `n` segments take.
    pub fn pieces_for(&self, n: usize) -> usize {
        match self {
            Segments::Whole(_) => n,
            Segments::Split(_) => 2 * n,
        }
    }

    /// Builds the headers of segments `segs` into `out`
    /// ([`header_bytes`](Self::header_bytes) of them).
    pub fn write_headers(
        &self,
        pkt: &[u8],
        segs: std::ops::Range<usize>,
        out: &mut [u8],
    ) -> Result<(), OffloadError> {
        match self {
            Segments::Whole(_) => Ok(()),
            Segments::Split(p) => write_split_headers(pkt, p, segs, out),
        }
    }

    /// Every segment as its own buffer, gathered from the same headers and
    /// pieces the egress loop sends (for tests, fuzzing and benchmarks; the
    /// data path itself never copies).
    pub fn collect(&self, pkt: &[u8]) -> Result<Vec<Vec<u8>>, OffloadError> {
        let mut headers = vec![0u8; self.header_bytes(self.count())];
        self.write_headers(pkt, 0..self.count(), &mut headers)?;
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(self.count());
        let whole = matches!(self, Segments::Whole(_));
        for piece in self.pieces(0..self.count(), 0) {
            let (starts, bytes) = match piece {
                SegmentPiece::Header(at, len) => (true, &headers[at..at + len]),
                SegmentPiece::Payload(r) => (whole, pkt.get(r).ok_or(OffloadError::BadPacket)?),
            };
            if starts {
                out.push(Vec::new());
            }
            out.last_mut()
                .expect("a segment starts first")
                .extend_from_slice(bytes);
        }
        Ok(out)
    }

    /// The pieces of segments `segs`, whose chunk's headers start with
    /// segment `chunk_start`.
    pub fn pieces(
        &self,
        segs: std::ops::Range<usize>,
        chunk_start: usize,
    ) -> impl Iterator<Item = SegmentPiece> + '_ {
        let (whole, plan) = match self {
            Segments::Whole(len) => (Some(*len), None),
            Segments::Split(p) => (None, Some(*p)),
        };
        let whole = whole.map(|len| SegmentPiece::Payload(0..len)).into_iter();
        let split = plan.into_iter().flat_map(move |p| {
            segs.clone().flat_map(move |k| {
                [
                    SegmentPiece::Header((k - chunk_start) * p.hlen, p.hlen),
                    SegmentPiece::Payload(p.data(k)),
                ]
            })
        });
        whole.chain(split)
    }
}

/// Room for the headers of every segment of a 64 KB super-packet even with
/// tiny segments (at most [`MAX_HEADER_LEN`] bytes each).
pub const MAX_GSO_HEADERS: usize = MAX_HEADER_LEN * 1024;

/// Facts about a TCP segment that GRO compares, or `None` if the packet may
/// not be coalesced (not IPv4/TCP, options, fragments, flags other than
/// ACK/PSH, no payload, or a bad checksum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSeg {
    pub hlen: usize,
    pub payload: usize,
    pub seq: u32,
    pub psh: bool,
}

pub fn tcp_segment(p: &[u8]) -> Option<TcpSeg> {
    // IPv4 without options (the header we rebuild is the first packet's).
    if p.len() < IPV4_MIN_HEADER + TCP_MIN_HEADER || p[0] != 0x45 {
        return None;
    }
    let ip = Ipv4Packet::new_unchecked(p);
    if ip.protocol() != PROTO_TCP || ip.is_fragment() {
        return None;
    }
    let t = TcpHeader::new_unchecked(&p[IPV4_MIN_HEADER..]);
    let th = t.header_len();
    if th < TCP_MIN_HEADER || p.len() <= IPV4_MIN_HEADER + th {
        return None;
    }
    let flags = t.flags();
    if flags & (FIN | SYN | RST | URG | ECE | CWR) != 0 || flags & ACK == 0 {
        return None;
    }
    // The data will be handed to the kernel as CHECKSUM_PARTIAL, so check
    // it here (wireguard-go does the same).
    let l4 = &p[IPV4_MIN_HEADER..];
    if fold(sum(l4, ip.pseudo_sum(l4.len() as u16))) != 0xffff {
        return None;
    }
    Some(TcpSeg {
        hlen: IPV4_MIN_HEADER + th,
        payload: p.len() - IPV4_MIN_HEADER - th,
        seq: t.seq(),
        psh: flags & PSH != 0,
    })
}

/// Whether `b` continues the flow of `a` for GRO: same addresses, ports,
/// ToS, DF, TTL, ack, header length, options, window and flags except PSH.
/// Both are segments [`tcp_segment`] accepted with header length `hlen`.
fn same_flow(a: &[u8], b: &[u8], hlen: usize) -> bool {
    let (ia, ib) = (Ipv4Packet::new_unchecked(a), Ipv4Packet::new_unchecked(b));
    let ta = TcpHeader::new_unchecked(&a[IPV4_MIN_HEADER..hlen]);
    let tb = TcpHeader::new_unchecked(&b[IPV4_MIN_HEADER..hlen]);
    ia.tos() == ib.tos()
        && ia.flags_frag() >> 13 == ib.flags_frag() >> 13
        && ia.ttl() == ib.ttl()
        && ia.addrs() == ib.addrs()
        && ta.ports() == tb.ports()
        && ta.ack_and_offset() == tb.ack_and_offset()
        && (ta.flags() & !PSH) == (tb.flags() & !PSH)
        && ta.window() == tb.window()
        && ta.options() == tb.options()
}

/// The same IPv4/TCP connection (addresses and ports): a packet that closes
/// a flow's open GRO run.
fn same_connection(a: &[u8], b: &[u8]) -> bool {
    let span = IPV4_MIN_HEADER + 4;
    a.len() >= span && b.len() >= span && a[12..span] == b[12..span]
}

/// Flows a [`GroTable`] keeps open at once in a batch.
pub const GRO_FLOWS: usize = 16;
const NONE: usize = usize::MAX;

#[derive(Debug, Clone, Copy)]
struct OpenRun {
    /// Item this run builds.
    item: usize,
    /// First and last packet of the run (indices into the batch).
    head: usize,
    tail: usize,
    hlen: usize,
    gso: usize,
    next_seq: u32,
    total: usize,
    count: usize,
}

/// Groups the packets of one receive batch into GRO items across
/// interleaved flows, as Linux's GRO list and wireguard-go's TCP GRO table
/// do. All traffic between two hosts arrives on one UDP 4-tuple, so the
/// inner TCP flows of a batch interleave; a run per flow is kept open while
/// the batch is walked, and a segment extends its flow's run when it
/// continues it exactly (same flow and header, next sequence number, no
/// larger than the first segment, room left). Anything else starts a new
/// item. Items come out in the order of their first packet and each holds
/// packets in batch order, so every flow keeps its order. Reused across
/// batches; no allocation once warm.
#[derive(Debug, Default)]
pub struct GroTable {
    open: Vec<OpenRun>,
    /// Next packet of the same item, per packet (NONE at the end).
    next: Vec<usize>,
    /// (first packet, packet count, verified) of each item, in output
    /// order; verified: TCP segments whose checksums [`tcp_segment`]
    /// checked (false for a lone packet it refused).
    items: Vec<(usize, usize, bool)>,
}

impl GroTable {
    pub fn new() -> Self {
        GroTable::default()
    }

    /// Groups packets `0..n`, `packet(i)` giving each one's bytes.
    pub fn group<'a>(&mut self, n: usize, packet: impl Fn(usize) -> &'a [u8]) {
        self.open.clear();
        self.items.clear();
        self.next.clear();
        self.next.resize(n, NONE);
        for i in 0..n {
            let p = packet(i);
            let Some(s) = tcp_segment(p) else {
                // Not coalescable (a pure ACK, FIN, a bad checksum, not
                // TCP): on its own, and it closes its flow's open run, so
                // nothing of that flow is written after it that came later.
                if p.len() >= IPV4_MIN_HEADER + TCP_MIN_HEADER
                    && p[0] == 0x45
                    && Ipv4Packet::new_unchecked(p).protocol() == PROTO_TCP
                {
                    self.open.retain(|r| !same_connection(packet(r.head), p));
                }
                self.items.push((i, 1, false));
                continue;
            };
            let found = self
                .open
                .iter()
                .position(|r| r.hlen == s.hlen && same_flow(packet(r.head), p, r.hlen));
            if let Some(j) = found {
                let r = &mut self.open[j];
                if s.seq == r.next_seq
                    && s.payload <= r.gso
                    && r.total + s.payload <= MAX_PACKET
                    && r.count < MAX_GSO_SEGMENTS
                {
                    self.next[r.tail] = i;
                    r.tail = i;
                    r.count += 1;
                    r.total += s.payload;
                    r.next_seq = r.next_seq.wrapping_add(s.payload as u32);
                    self.items[r.item].1 = r.count;
                    // A short segment, PSH or a full run closes it.
                    if s.payload < r.gso || s.psh || r.count == MAX_GSO_SEGMENTS {
                        self.open.swap_remove(j);
                    }
                    continue;
                }
                // Not a continuation: this flow's run is over.
                self.open.swap_remove(j);
            }
            let item = self.items.len();
            self.items.push((i, 1, true));
            if s.psh {
                continue; // PSH on a first segment: deliver it alone
            }
            if self.open.len() == GRO_FLOWS {
                self.open.remove(0); // the oldest run stays as it is
            }
            self.open.push(OpenRun {
                item,
                head: i,
                tail: i,
                hlen: s.hlen,
                gso: s.payload,
                next_seq: s.seq.wrapping_add(s.payload as u32),
                total: p.len(),
                count: 1,
            });
        }
    }

    /// Number of items (super-packets or single packets) to write.
    pub fn items(&self) -> usize {
        self.items.len()
    }

    /// Whether item `k`'s TCP checksums were verified here: then it goes
    /// to the TUN as CHECKSUM_PARTIAL (with [`coalesce_header`]), also when
    /// it is one segment, and the kernel does not sum its payload again.
    pub fn verified(&self, k: usize) -> bool {
        self.items[k].2
    }

    /// The packets of item `k`, in order.
    pub fn item(&self, k: usize) -> GroItem<'_> {
        let (head, count, _) = self.items[k];
        GroItem {
            next: &self.next,
            at: head,
            left: count,
        }
    }
}

/// The packet indices of one [`GroTable`] item.
#[derive(Debug, Clone)]
pub struct GroItem<'a> {
    next: &'a [usize],
    at: usize,
    left: usize,
}

impl GroItem<'_> {
    pub fn len(&self) -> usize {
        self.left
    }

    pub fn is_empty(&self) -> bool {
        self.left == 0
    }
}

impl Iterator for GroItem<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.left == 0 {
            return None;
        }
        let i = self.at;
        self.left -= 1;
        self.at = self.next[i];
        Some(i)
    }
}

/// Writes the vnet header and the IPv4/TCP headers of the super-packet of
/// a verified item of a [`GroTable`] into `out` (NEEDS_CSUM with the
/// pseudo-header sum in the TCP checksum field; GSO_TCPV4 for two segments
/// or more, no GSO for one). The payloads follow unchanged, each packet's
/// bytes after `hlen`. Returns (bytes written, hlen).
pub fn coalesce_header<'a, I>(run: I, out: &mut [u8]) -> Result<(usize, usize), OffloadError>
where
    I: Iterator<Item = &'a [u8]> + Clone,
{
    let first = run.clone().next().ok_or(OffloadError::BadPacket)?;
    let seg = tcp_segment(first).ok_or(OffloadError::BadPacket)?;
    let h = seg.hlen;
    let mut len = h;
    let mut last_psh = false;
    let mut count = 0;
    for p in run {
        if p.len() < h {
            return Err(OffloadError::BadPacket);
        }
        count += 1;
        len += p.len() - h;
        last_psh = TcpHeader::new_unchecked(&p[IPV4_MIN_HEADER..]).flags() & PSH != 0;
    }
    if len > MAX_PACKET || out.len() < VNET_HDR_LEN + h {
        return Err(OffloadError::NoRoom);
    }
    let gso = count > 1;
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if gso { GSO_TCPV4 } else { GSO_NONE },
        hdr_len: h as u16,
        gso_size: if gso { seg.payload as u16 } else { 0 },
        csum_start: IPV4_MIN_HEADER as u16,
        csum_offset: TcpHeader::<&[u8]>::CHECKSUM_AT as u16,
    }
    .encode(out);
    let o = &mut out[VNET_HDR_LEN..VNET_HDR_LEN + h];
    o.copy_from_slice(&first[..h]);
    let (ip, t) = o.split_at_mut(IPV4_MIN_HEADER);
    let mut ip = Ipv4Packet::new_unchecked(ip);
    ip.set_total_len(len as u16);
    ip.fill_checksum();
    let mut t = TcpHeader::new_unchecked(t);
    if last_psh {
        t.set_flags(t.flags() | PSH);
    }
    // CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum.
    t.set_checksum(fold(ip.pseudo_sum((len - IPV4_MIN_HEADER) as u16)));
    Ok((VNET_HDR_LEN + h, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{checksum, pseudo_header_sum};

    /// An IPv4/TCP super-packet as the kernel hands it over with TSO: full
    /// total length, TCP checksum field = pseudo-header sum.
    fn tso_packet(payload: &[u8], seq: u32, opts: usize, flags: u8) -> Vec<u8> {
        let th = 20 + opts;
        let len = 20 + th + payload.len();
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0xfff0u16.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 5, 1, 0]);
        p[16..20].copy_from_slice(&[10, 5, 2, 0]);
        let ck = checksum(&p[..20]);
        p[10..12].copy_from_slice(&ck.to_be_bytes());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&77u32.to_be_bytes());
        p[32] = ((th / 4) as u8) << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&512u16.to_be_bytes());
        for (i, b) in p[40..40 + opts].iter_mut().enumerate() {
            *b = if i < 2 { 1 } else { i as u8 }; // NOPs, then junk
        }
        p[20 + th..].copy_from_slice(payload);
        let ps = fold(pseudo_header_sum(
            &p[12..16],
            &p[16..20],
            PROTO_TCP,
            (len - 20) as u16,
        ));
        p[36..38].copy_from_slice(&ps.to_be_bytes());
        p
    }

    fn tso_hdr(p: &[u8], gso: u16) -> VnetHdr {
        let th = ((p[32] >> 4) as u16) * 4;
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 20 + th,
            gso_size: gso,
            csum_start: 20,
            csum_offset: 16,
        }
    }

    /// A super-packet's layout, for the tests' checks.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Split {
        count: usize,
        seg_len: usize,
        total: usize,
    }

    /// The segments of a super-packet, back to back in `out`, as the
    /// egress loop gathers them ([`Segments::collect`]).
    fn gso_split(pkt: &[u8], hdr: &VnetHdr, out: &mut [u8]) -> Result<Split, OffloadError> {
        let segs = Segments::Split(split_plan(pkt, hdr)?);
        let all = segs.collect(pkt)?;
        let total: usize = all.iter().map(Vec::len).sum();
        if out.len() < total {
            return Err(OffloadError::NoRoom);
        }
        let mut at = 0;
        for seg in &all {
            out[at..at + seg.len()].copy_from_slice(seg);
            at += seg.len();
        }
        Ok(Split {
            count: all.len(),
            seg_len: all[0].len(),
            total,
        })
    }

    fn segments(out: &[u8], s: Split) -> Vec<&[u8]> {
        (0..s.count)
            .map(|k| &out[k * s.seg_len..((k + 1) * s.seg_len).min(s.total)])
            .collect()
    }

    /// How many packets from the first on the ingress path's GRO table
    /// puts into the first packet's super-packet.
    fn coalesce_run<'a>(pkts: impl IntoIterator<Item = &'a [u8]>) -> usize {
        let pkts: Vec<&[u8]> = pkts.into_iter().collect();
        if pkts.is_empty() {
            return 0;
        }
        let mut g = GroTable::new();
        g.group(pkts.len(), |i| pkts[i]);
        (0..g.items())
            .map(|k| g.item(k).collect::<Vec<_>>())
            .find(|item| item[0] == 0)
            .map_or(0, |item| {
                // Only a run from the first packet on counts.
                item.iter()
                    .enumerate()
                    .take_while(|(j, &i)| *j == i)
                    .count()
            })
    }

    /// The super-packet the ingress path writes for a run: the header it
    /// builds, then each packet's payload (its gather write, as one buffer).
    fn coalesce<'a, I>(run: I, out: &mut [u8]) -> Result<usize, OffloadError>
    where
        I: Iterator<Item = &'a [u8]> + Clone,
    {
        let (mut at, h) = coalesce_header(run.clone(), out)?;
        for p in run {
            let d = &p[h..];
            out.get_mut(at..at + d.len())
                .ok_or(OffloadError::NoRoom)?
                .copy_from_slice(d);
            at += d.len();
        }
        Ok(at)
    }

    #[test]
    fn vnet_header_round_trip() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: 52,
            gso_size: 1420,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut b = [0u8; 10];
        h.encode(&mut b);
        assert_eq!(VnetHdr::decode(&b).unwrap(), h);
        assert_eq!(VnetHdr::decode(&b[..9]), Err(OffloadError::ShortHeader));
    }

    #[test]
    fn split_makes_valid_mtu_sized_packets() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let p = tso_packet(&payload, 1000, 12, ACK | PSH);
        let mut out = vec![0u8; 20_000];
        let s = gso_split(&p, &tso_hdr(&p, 1408), &mut out).unwrap();
        assert_eq!(s.count, 8);
        assert_eq!(s.seg_len, 52 + 1408);
        let segs = segments(&out, s);
        let mut data = Vec::new();
        for (k, seg) in segs.iter().enumerate() {
            let v = crate::wire::Ipv4Packet::new_checked(*seg).expect("valid IPv4");
            assert!(v.header_checksum_ok());
            assert!(seg.len() <= 1460);
            assert_eq!(
                u16::from_be_bytes([seg[4], seg[5]]),
                0xfff0u16.wrapping_add(k as u16)
            );
            assert!(tcp_checksum_ok(seg), "TCP checksum of segment {k}");
            let t = &seg[20..];
            assert_eq!(
                u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
                1000 + (k as u32) * 1408
            );
            assert_eq!(t[13] & PSH != 0, k == 7, "PSH only on the last");
            data.extend_from_slice(&t[32..]);
        }
        assert_eq!(data, payload);
    }

    #[test]
    fn fitting_to_a_narrow_path_cuts_tcp_finer_and_nothing_else() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 13) as u8).collect();
        let p = tso_packet(&payload, 7, 12, ACK | PSH);
        let full = Segments::of(&p, &tso_hdr(&p, 1420)).unwrap();
        assert_eq!(full.seg_len(), 52 + 1420);
        // A 1400-byte path, 28 of it the outer IPv4 + UDP headers.
        let fit = full.fit(1372);
        assert_eq!(fit.seg_len(), 1372);
        assert_eq!(fit.count(), 10_000usize.div_ceil(1372 - 52));
        let mut data = Vec::new();
        for (k, seg) in fit.collect(&p).unwrap().iter().enumerate() {
            assert!(seg.len() <= 1372, "segment {k}: {} bytes", seg.len());
            let v = crate::wire::Ipv4Packet::new_checked(&seg[..]).expect("valid IPv4");
            assert!(v.header_checksum_ok());
            assert!(tcp_checksum_ok(seg), "TCP checksum of segment {k}");
            let t = &seg[20..];
            assert_eq!(
                u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
                7 + (k as u32) * 1320,
                "sequence number of segment {k}"
            );
            assert_eq!(
                t[13] & PSH != 0,
                k + 1 == fit.count(),
                "PSH only on the last"
            );
            data.extend_from_slice(&t[32..]);
        }
        assert_eq!(data, payload, "the cut segments carry the payload in order");
        // Segments that already fit, and a limit that leaves no payload,
        // stay as they are.
        assert_eq!(full.fit(1472), full);
        assert_eq!(full.fit(52), full);
        // UDP datagram boundaries are the sender's: never cut.
        let u = uso_packet(&[5u8; 4000]);
        let uso = Segments::of(&u, &uso_hdr(1400)).unwrap();
        assert_eq!(uso.fit(1000), uso);
        let whole = Segments::Whole(1500);
        assert_eq!(whole.fit(1000), whole);
    }

    /// An IPv4/UDP super-packet as the kernel hands it over with USO:
    /// full lengths, UDP checksum field = pseudo-header sum.
    fn uso_packet(payload: &[u8]) -> Vec<u8> {
        let len = 28 + payload.len();
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[8] = 64;
        p[9] = PROTO_UDP;
        p[12..16].copy_from_slice(&[10, 5, 1, 9]);
        p[16..20].copy_from_slice(&[10, 5, 2, 9]);
        let ck = checksum(&p[..20]);
        p[10..12].copy_from_slice(&ck.to_be_bytes());
        p[20..22].copy_from_slice(&5353u16.to_be_bytes());
        p[22..24].copy_from_slice(&6000u16.to_be_bytes());
        p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        let ps = fold(pseudo_header_sum(
            &p[12..16],
            &p[16..20],
            PROTO_UDP,
            (len - 20) as u16,
        ));
        p[26..28].copy_from_slice(&ps.to_be_bytes());
        p
    }

    fn uso_hdr(gso: u16) -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: 28,
            gso_size: gso,
            csum_start: 20,
            csum_offset: 6,
        }
    }

    /// A segment's TCP checksum, verified over its pseudo-header.
    fn tcp_checksum_ok(seg: &[u8]) -> bool {
        let t = &seg[20..];
        fold(sum(
            t,
            pseudo_header_sum(&seg[12..16], &seg[16..20], 6, t.len() as u16),
        )) == 0xffff
    }

    /// Each segment's UDP checksum, verified over its pseudo-header.
    fn udp_checksum_ok(seg: &[u8]) -> bool {
        let t = &seg[20..];
        fold(sum(
            t,
            pseudo_header_sum(&seg[12..16], &seg[16..20], 17, t.len() as u16),
        )) == 0xffff
    }

    #[test]
    fn udp_split_makes_one_datagram_per_segment() {
        // 5000 bytes at 1400 per segment: 1400, 1400, 1400, 800.
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 13 + 1) as u8).collect();
        let p = uso_packet(&payload);
        let mut out = vec![0u8; 8000];
        let s = gso_split(&p, &uso_hdr(1400), &mut out).unwrap();
        assert_eq!((s.count, s.seg_len, s.total), (4, 1428, 5000 + 4 * 28));
        let segs = segments(&out, s);
        let mut data = Vec::new();
        for (k, seg) in segs.iter().enumerate() {
            let want = if k < 3 { 1400 } else { 800 };
            let v = crate::wire::Ipv4Packet::new_checked(*seg).expect("valid IPv4");
            assert!(v.header_checksum_ok(), "IP checksum of segment {k}");
            assert_eq!(seg.len(), 28 + want);
            assert_eq!(u16::from_be_bytes([seg[2], seg[3]]) as usize, 28 + want);
            assert_eq!(u16::from_be_bytes([seg[4], seg[5]]), 0x1234 + k as u16);
            assert_eq!(&seg[20..24], &p[20..24], "ports kept");
            assert_eq!(u16::from_be_bytes([seg[24], seg[25]]) as usize, 8 + want);
            assert!(udp_checksum_ok(seg), "UDP checksum of segment {k}");
            data.extend_from_slice(&seg[28..]);
        }
        assert_eq!(data, payload);
        // A payload that is an exact multiple of the segment size.
        let p = uso_packet(&payload[..2800]);
        let s = gso_split(&p, &uso_hdr(1400), &mut out).unwrap();
        assert_eq!((s.count, s.total), (2, 2800 + 56));
        // A USO header on a TCP packet (or TSO on UDP) is refused.
        let t = tso_packet(&[1; 3000], 1, 0, ACK);
        assert_eq!(
            gso_split(&t, &uso_hdr(1000), &mut out),
            Err(OffloadError::GsoType(GSO_UDP_L4))
        );
        assert!(gso_split(&p, &tso_hdr(&t, 1000), &mut out).is_err());
    }

    #[test]
    fn segments_of_a_plain_packet_and_of_a_super_packet_gather_the_same_bytes() {
        // A plain packet: one segment, the packet itself, no headers built.
        let plain = crate::wire::tests::udp_packet([10, 5, 1, 2], [10, 5, 2, 3], 64, b"hi");
        let s = Segments::of(&plain, &VnetHdr::default()).unwrap();
        assert_eq!(
            (s.count(), s.total(), s.header_bytes(1)),
            (1, plain.len(), 0)
        );
        let pieces: Vec<_> = s.pieces(0..1, 0).collect();
        assert_eq!(pieces, vec![SegmentPiece::Payload(0..plain.len())]);

        // A super-packet: gathering each segment's pieces from the header
        // area and the packet gives what gso_split lays out, chunk by chunk.
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let p = tso_packet(&payload, 42, 12, ACK | PSH);
        let hdr = tso_hdr(&p, 700);
        let s = Segments::of(&p, &hdr).unwrap();
        let mut want = vec![0u8; 20_000];
        let split = gso_split(&p, &hdr, &mut want).unwrap();
        assert_eq!((s.count(), s.total()), (split.count, split.total));
        let mut got = Vec::new();
        let chunk = 5;
        for first in (0..s.count()).step_by(chunk) {
            let segs = first..(first + chunk).min(s.count());
            let mut area = vec![0u8; s.header_bytes(segs.len())];
            s.write_headers(&p, segs.clone(), &mut area).unwrap();
            assert_eq!(
                s.pieces(segs.clone(), first).count(),
                s.pieces_for(segs.len())
            );
            for piece in s.pieces(segs, first) {
                match piece {
                    SegmentPiece::Header(at, len) => got.extend_from_slice(&area[at..at + len]),
                    SegmentPiece::Payload(r) => got.extend_from_slice(&p[r]),
                }
            }
        }
        assert_eq!(got, want[..split.total]);
        // A plan that does not fit the vnet header is an error, not a panic.
        let mut bad = hdr;
        bad.csum_start = 3;
        assert!(Segments::of(&p, &bad).is_err());
    }

    #[test]
    fn udp_split_never_sends_a_zero_checksum() {
        // Find the two payload bytes that make segment 0's checksum
        // compute to 0, which UDP must send as 0xffff (0 = "no checksum").
        let mut payload = vec![0x5au8; 3000];
        payload[0..2].copy_from_slice(&[0, 0]);
        let mut out = vec![0u8; 8000];
        let s = gso_split(&uso_packet(&payload), &uso_hdr(1000), &mut out).unwrap();
        let ck = u16::from_be_bytes([out[26], out[27]]);
        // With that word 0 the checksum is !fold(S); writing w = !fold(S)
        // there makes the sum 0xffff and the computed checksum 0.
        payload[0..2].copy_from_slice(&ck.to_be_bytes());
        let s2 = gso_split(&uso_packet(&payload), &uso_hdr(1000), &mut out).unwrap();
        assert_eq!(s2, s);
        assert_eq!(u16::from_be_bytes([out[26], out[27]]), 0xffff);
        assert!(udp_checksum_ok(&out[..s.seg_len]));
    }

    #[test]
    fn split_rejects_inconsistent_headers() {
        let p = tso_packet(&[1; 3000], 1, 0, ACK);
        let mut out = vec![0u8; 8000];
        let mut h = tso_hdr(&p, 1000);
        h.gso_size = 0;
        assert!(gso_split(&p, &h, &mut out).is_err());
        let mut h = tso_hdr(&p, 1000);
        h.csum_start = 24;
        assert!(gso_split(&p, &h, &mut out).is_err());
        let mut h = tso_hdr(&p, 1000);
        h.gso_type = GSO_TCPV6;
        assert_eq!(
            gso_split(&p, &h, &mut out),
            Err(OffloadError::GsoType(GSO_TCPV6))
        );
        assert_eq!(
            gso_split(&p, &tso_hdr(&p, 1000), &mut out[..100]),
            Err(OffloadError::NoRoom)
        );
        assert!(gso_split(&p[..30], &tso_hdr(&p, 1000), &mut out).is_err());
    }

    #[test]
    fn complete_checksum_fills_in_partial() {
        let p0 = tso_packet(&[9; 100], 5, 0, ACK);
        let mut p = p0.clone();
        complete_checksum(&mut p, &tso_hdr(&p0, 0)).unwrap();
        let t = &p[20..];
        assert_eq!(
            fold(sum(
                t,
                pseudo_header_sum(&p[12..16], &p[16..20], 6, t.len() as u16)
            )),
            0xffff
        );
    }

    #[test]
    fn coalesce_stops_at_gaps_other_flows_and_flags() {
        let payload = vec![3u8; 4000];
        let p = tso_packet(&payload, 0, 12, ACK);
        let mut out = vec![0u8; 8000];
        let s = gso_split(&p, &tso_hdr(&p, 1000), &mut out).unwrap();
        let segs = segments(&out, s);
        assert_eq!(coalesce_run(segs.iter().copied()), 4);
        // A gap in sequence numbers ends the run.
        assert_eq!(coalesce_run([segs[0], segs[2]]), 1);
        // A different flow ends the run.
        let mut other = segs[1].to_vec();
        other[22] ^= 1; // dst port
        assert_eq!(coalesce_run([segs[0], &other[..]]), 1);
        // A bad checksum is never coalesced.
        let mut bad = segs[1].to_vec();
        bad[60] ^= 0xff;
        assert_eq!(coalesce_run([segs[0], &bad[..]]), 1);
        // SYN is never coalesced; PSH on the first ends it.
        let syn = tso_packet(&[1; 10], 0, 0, SYN | ACK);
        assert_eq!(coalesce_run([&syn[..], &syn[..]]), 1);
        let psh = tso_packet(&[1; 10], 0, 0, PSH | ACK);
        assert_eq!(coalesce_run([&psh[..], segs[0]]), 1);
        assert_eq!(coalesce_run(std::iter::empty()), 0);
    }

    #[test]
    fn a_lone_verified_segment_goes_out_checksum_partial_and_nothing_else_does() {
        let segs = flow_segments(0, 3000, 1000, 12);
        let mut bad = segs[1].clone();
        bad[60] ^= 0xff;
        let ack = tso_packet(&[], 0, 0, ACK); // no payload: never coalesced
        let lone = [&segs[0][..], &bad[..], &ack[..]];
        let mut g = GroTable::new();
        g.group(lone.len(), |i| lone[i]);
        assert_eq!(g.items(), 3);
        assert_eq!(
            (0..3).map(|k| g.verified(k)).collect::<Vec<_>>(),
            [true, false, false]
        );

        // The one segment's header: NEEDS_CSUM, no GSO, the pseudo-header
        // sum in the field; completing it gives back the segment as sent.
        let mut head = vec![0u8; 256];
        let (hl, h) = coalesce_header([&segs[0][..]].into_iter(), &mut head).unwrap();
        let hdr = VnetHdr::decode(&head).unwrap();
        assert_eq!(
            (hdr.flags, hdr.gso_type, hdr.gso_size),
            (F_NEEDS_CSUM, GSO_NONE, 0)
        );
        let mut pkt = head[VNET_HDR_LEN..hl].to_vec();
        pkt.extend_from_slice(&segs[0][h..]);
        assert_ne!(pkt, segs[0], "the field holds the partial sum");
        complete_checksum(&mut pkt, &hdr).unwrap();
        assert_eq!(pkt, segs[0]);
        // Two segments are one GSO super-packet.
        let (_, _) = coalesce_header(segs[..2].iter().map(|s| &s[..]), &mut head).unwrap();
        let hdr = VnetHdr::decode(&head).unwrap();
        assert_eq!((hdr.gso_type, hdr.gso_size), (GSO_TCPV4, 1000));
    }

    /// The segments of one flow: `len` payload bytes (a pattern keyed by
    /// `flow`) cut at `gso`, source port 40000 + flow.
    fn flow_segments(flow: usize, len: usize, gso: u16, opts: usize) -> Vec<Vec<u8>> {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + flow * 31 + 1) as u8).collect();
        let mut p = tso_packet(&payload, 1000 * flow as u32, opts, ACK);
        p[20..22].copy_from_slice(&(40000 + flow as u16).to_be_bytes());
        let mut out = vec![0u8; 200_000];
        let s = gso_split(&p, &tso_hdr(&p, gso), &mut out).unwrap();
        segments(&out, s).into_iter().map(|x| x.to_vec()).collect()
    }

    #[test]
    fn gro_table_coalesces_interleaved_flows_and_keeps_them_apart() {
        // Two flows, strictly alternating: a consecutive-run GRO gets
        // nothing; the table makes one super-packet per flow.
        let a = flow_segments(1, 8 * 1000, 1000, 12);
        let b = flow_segments(2, 8 * 1000, 1000, 12);
        let batch: Vec<&[u8]> = a
            .iter()
            .zip(&b)
            .flat_map(|(x, y)| [&x[..], &y[..]])
            .collect();
        let mut g = GroTable::new();
        g.group(batch.len(), |i| batch[i]);
        assert_eq!(g.items(), 2);
        assert_eq!(
            g.item(0).collect::<Vec<_>>(),
            vec![0, 2, 4, 6, 8, 10, 12, 14]
        );
        assert_eq!(
            g.item(1).collect::<Vec<_>>(),
            vec![1, 3, 5, 7, 9, 11, 13, 15]
        );
        // A non-TCP packet in between stays on its own, in place.
        let mut with_udp = batch.clone();
        let udp = [
            0x45u8, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 5, 1, 0, 10, 5, 2, 0, 0, 1, 0, 2, 0, 8,
            0, 0,
        ];
        with_udp.insert(3, &udp);
        g.group(with_udp.len(), |i| with_udp[i]);
        assert_eq!(g.items(), 3);
        assert_eq!(
            g.item(0).collect::<Vec<_>>(),
            vec![0, 2, 5, 7, 9, 11, 13, 15]
        );
        assert_eq!(g.item(2).collect::<Vec<_>>(), vec![3]);
        // A gap in one flow starts a new item for that flow only.
        let mut gap = batch.clone();
        gap.remove(4); // flow a's third segment
        g.group(gap.len(), |i| gap[i]);
        assert_eq!(g.items(), 3);
        assert_eq!(g.item(0).collect::<Vec<_>>(), vec![0, 2]);
    }

    proptest::proptest! {
        /// Any interleaving of N flows' segments comes out with each flow's
        /// bytes intact and in order, each item one flow's consecutive
        /// segments, and every flow coalesced as far as runs allow.
        #[test]
        fn gro_table_keeps_every_flow_intact_and_in_order(
            flows in 1usize..8,
            lens in proptest::collection::vec(1usize..30_000, 8),
            gso in 200u16..1460,
            opts in proptest::sample::select(vec![0usize, 12]),
            order in proptest::collection::vec(0usize..8, 0..600),
        ) {
            let segs: Vec<Vec<Vec<u8>>> = (0..flows).map(|f| flow_segments(f, lens[f], gso, opts)).collect();
            // Interleave: take from the flow `order` names (skipping
            // finished ones), then drain the rest in flow order.
            let mut at = vec![0usize; flows];
            let mut batch: Vec<(usize, &[u8])> = Vec::new();
            for &o in &order {
                let f = o % flows;
                if at[f] < segs[f].len() {
                    batch.push((f, &segs[f][at[f]]));
                    at[f] += 1;
                }
            }
            for f in 0..flows {
                while at[f] < segs[f].len() {
                    batch.push((f, &segs[f][at[f]]));
                    at[f] += 1;
                }
            }
            let mut g = GroTable::new();
            g.group(batch.len(), |i| batch[i].1);
            let mut got = vec![Vec::new(); flows];
            let mut items_of = vec![0usize; flows];
            let mut seen = 0;
            for k in 0..g.items() {
                let idx: Vec<usize> = g.item(k).collect();
                seen += idx.len();
                let f = batch[idx[0]].0;
                items_of[f] += 1;
                proptest::prop_assert!(idx.windows(2).all(|w| w[0] < w[1]), "item out of batch order");
                proptest::prop_assert!(idx.iter().all(|&i| batch[i].0 == f), "item mixes flows");
                let pkts = idx.iter().map(|&i| batch[i].1);
                if idx.len() > 1 {
                    let mut sp = vec![0u8; 70_000];
                    let w = coalesce(pkts, &mut sp).unwrap();
                    let sp = &sp[VNET_HDR_LEN..w];
                    proptest::prop_assert!(crate::wire::Ipv4Packet::new_checked(sp).unwrap().header_checksum_ok());
                    got[f].extend_from_slice(&sp[40 + opts..]);
                } else {
                    got[f].extend_from_slice(&batch[idx[0]].1[40 + opts..]);
                }
            }
            proptest::prop_assert_eq!(seen, batch.len(), "every packet written once");
            for f in 0..flows {
                let want: Vec<u8> = (0..lens[f]).map(|i| (i * 7 + f * 31 + 1) as u8).collect();
                proptest::prop_assert_eq!(&got[f], &want, "flow {} bytes", f);
                // With at most 8 flows open, nothing is evicted: only the
                // 64-segment and 64 KB limits split a flow.
                let per = MAX_GSO_SEGMENTS.min((MAX_PACKET - 40 - opts) / gso as usize);
                proptest::prop_assert_eq!(items_of[f], segs[f].len().div_ceil(per.max(1)),
                    "flow {} split into {} items for {} segments", f, items_of[f], segs[f].len());
            }
        }
    }

    proptest::proptest! {
        /// Splitting a super-packet and coalescing the segments gives back
        /// the original packet: same headers (but the IP id), same bytes.
        #[test]
        fn split_then_coalesce_is_identity(
            len in 1usize..20_000,
            gso in 200u16..1500,
            opts in proptest::sample::select(vec![0usize, 12, 40]),
            seq in proptest::prelude::any::<u32>(),
            psh in proptest::prelude::any::<bool>(),
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let flags = ACK | if psh { PSH } else { 0 };
            let p = tso_packet(&payload, seq, opts, flags);
            proptest::prop_assume!(p.len() <= MAX_PACKET);
            let hdr = tso_hdr(&p, gso);
            let mut out = vec![0u8; 40_000];
            let s = gso_split(&p, &hdr, &mut out).unwrap();
            let segs = segments(&out, s);
            let mut at = 0;
            let mut rebuilt = Vec::new();
            let mut first_hdr = None;
            while at < segs.len() {
                let n = coalesce_run(segs[at..].iter().copied());
                proptest::prop_assert!(n >= 1);
                if n == 1 {
                    rebuilt.extend_from_slice(&segs[at][20 + 20 + opts..]);
                } else {
                    let mut sp = vec![0u8; 70_000];
                    let w = coalesce(segs[at..at + n].iter().copied(), &mut sp).unwrap();
                    let h = VnetHdr::decode(&sp).unwrap();
                    proptest::prop_assert_eq!(h.gso_type, GSO_TCPV4);
                    let sp = &sp[VNET_HDR_LEN..w];
                    proptest::prop_assert!(crate::wire::Ipv4Packet::new_checked(sp).unwrap().header_checksum_ok());
                    first_hdr.get_or_insert(sp[..40 + opts].to_vec());
                    rebuilt.extend_from_slice(&sp[40 + opts..]);
                }
                at += n;
            }
            proptest::prop_assert_eq!(&rebuilt, &payload);
            // Everything coalesces back into one packet when it fits.
            if segs.len() <= MAX_GSO_SEGMENTS {
                let n = coalesce_run(segs.iter().copied());
                proptest::prop_assert_eq!(n, segs.len());
                if n > 1 {
                    let mut sp = vec![0u8; 70_000];
                    let w = coalesce(segs.iter().copied(), &mut sp).unwrap();
                    let sp = &sp[VNET_HDR_LEN..w];
                    proptest::prop_assert_eq!(sp.len(), p.len());
                    // Identical to the original but for the checksum fields.
                    proptest::prop_assert_eq!(&sp[..10], &p[..10]);
                    proptest::prop_assert_eq!(&sp[12..36], &p[12..36]);
                    proptest::prop_assert_eq!(&sp[38..], &p[38..]);
                    proptest::prop_assert_eq!(&sp[36..38], &p[36..38], "pseudo-header sum");
                }
            }
            let _ = first_hdr;
        }
    }
}
