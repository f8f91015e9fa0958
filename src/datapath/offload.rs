//! TUN offloads without I/O: the `virtio_net_hdr` the kernel puts in front
//! of each packet on an `IFF_VNET_HDR` TUN, splitting TCP/UDP super-packets
//! (TSO/USO) into MTU-sized IPv4 packets laid out back to back for one UDP
//! GSO send, and coalescing consecutive in-order TCP segments of one flow
//! into a super-packet for one TUN write (GRO in userspace).
//!
//! Offloads are local to this host: every datagram on the wire is still one
//! ordinary IPv4 packet with correct checksums.

use crate::wire::{fold, pseudo_header_sum, sum, PROTO_TCP, PROTO_UDP};

pub const VNET_HDR_LEN: usize = 10;
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;
/// The most segments one UDP GSO send may carry (the kernel's UDP_MAX_SEGMENTS).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Largest IPv4 packet.
pub const MAX_PACKET: usize = 65535;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;

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

/// How a super-packet was laid out by [`gso_split`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// Number of packets.
    pub count: usize,
    /// Length of every packet but the last (the UDP GSO segment size).
    pub seg_len: usize,
    /// Bytes written.
    pub total: usize,
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
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return Err(bad);
    }
    let iph = ((pkt[0] & 0x0f) as usize) * 4;
    let proto = pkt[9];
    let tcp = match hdr.gso_type & !GSO_ECN {
        GSO_TCPV4 if proto == PROTO_TCP => true,
        GSO_UDP_L4 if proto == PROTO_UDP => false,
        t => return Err(OffloadError::GsoType(t)),
    };
    if iph < 20 || hdr.csum_start as usize != iph {
        return Err(bad);
    }
    // Do not trust hdr_len (it can cover the whole first packet on the
    // forwarding path): derive it from the transport header.
    let th = if tcp {
        if pkt.len() < iph + 20 {
            return Err(bad);
        }
        let l = ((pkt[iph + 12] >> 4) as usize) * 4;
        if !(20..=60).contains(&l) {
            return Err(bad);
        }
        l
    } else {
        8
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
    let (iph, tcp, gso) = (plan.iph, plan.tcp, plan.gso);
    let th = hlen - iph;
    let proto = pkt[9];
    let id = u16::from_be_bytes([pkt[4], pkt[5]]);
    let seq = u32::from_be_bytes([pkt[iph + 4], pkt[iph + 5], pkt[iph + 6], pkt[iph + 7]]);
    let csum_at = if tcp { 16 } else { 6 };
    for (j, k) in segs.enumerate() {
        let data = &pkt[plan.data(k)];
        let len = hlen + data.len();
        let o = &mut out[j * hlen..(j + 1) * hlen];
        o.copy_from_slice(&pkt[..hlen]);
        // IPv4 header.
        o[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        o[4..6].copy_from_slice(&id.wrapping_add(k as u16).to_be_bytes());
        o[10] = 0;
        o[11] = 0;
        let ck = !fold(sum(&o[..iph], 0));
        o[10..12].copy_from_slice(&ck.to_be_bytes());
        let (ip, t) = o.split_at_mut(iph);
        // Transport header.
        if tcp {
            t[4..8].copy_from_slice(&seq.wrapping_add((k * gso) as u32).to_be_bytes());
            if k + 1 != plan.count {
                t[13] &= !(TCP_FIN | TCP_PSH);
            }
            if k != 0 {
                t[13] &= !0x80;
            }
        } else {
            t[4..6].copy_from_slice(&((th + data.len()) as u16).to_be_bytes());
        }
        t[csum_at] = 0;
        t[csum_at + 1] = 0;
        let pseudo = pseudo_header_sum(&ip[12..16], &ip[16..20], proto, (th + data.len()) as u16);
        let ck = !fold(sum(data, sum(t, pseudo)));
        // UDP: a computed 0 is sent as 0xffff (0 means "no checksum").
        let ck = if !tcp && ck == 0 { 0xffff } else { ck };
        t[csum_at..csum_at + 2].copy_from_slice(&ck.to_be_bytes());
    }
    Ok(())
}

/// [`split_plan`] and the headers of every segment into `headers`.
pub fn gso_split_headers(
    pkt: &[u8],
    hdr: &VnetHdr,
    headers: &mut [u8],
) -> Result<SplitPlan, OffloadError> {
    let plan = split_plan(pkt, hdr)?;
    write_split_headers(pkt, &plan, 0..plan.count, headers)?;
    Ok(plan)
}

/// Like [`gso_split_headers`], but writes whole packets back to back into
/// `out`. Allocates: for tests and fuzzing, not the packet path (which
/// sends the pieces with scatter-gather I/O instead of copying).
pub fn gso_split(pkt: &[u8], hdr: &VnetHdr, out: &mut [u8]) -> Result<Split, OffloadError> {
    let mut headers = vec![0u8; MAX_GSO_HEADERS];
    let plan = gso_split_headers(pkt, hdr, &mut headers)?;
    let total = plan.total();
    if out.len() < total {
        return Err(OffloadError::NoRoom);
    }
    for k in 0..plan.count {
        let at = k * plan.seg_len();
        let data = &pkt[plan.data(k)];
        out[at..at + plan.hlen].copy_from_slice(&headers[k * plan.hlen..(k + 1) * plan.hlen]);
        out[at + plan.hlen..at + plan.hlen + data.len()].copy_from_slice(data);
    }
    let seg_len = if plan.count == 1 {
        total
    } else {
        plan.seg_len()
    };
    Ok(Split {
        count: plan.count,
        seg_len,
        total,
    })
}

/// Room for the headers of every segment of a 64 KB super-packet even with
/// tiny segments (at most 120 bytes of IPv4 + TCP header each).
pub const MAX_GSO_HEADERS: usize = 120 * 1024;

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
    if p.len() < 40 || p[0] != 0x45 || p[9] != PROTO_TCP {
        return None;
    }
    // No fragments (MF or offset).
    if u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
        return None;
    }
    let th = ((p[20 + 12] >> 4) as usize) * 4;
    if th < 20 || p.len() <= 20 + th {
        return None;
    }
    let flags = p[20 + 13];
    if flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_URG | 0xc0) != 0 || flags & TCP_ACK == 0 {
        return None;
    }
    // The data will be handed to the kernel as CHECKSUM_PARTIAL, so check
    // it here (wireguard-go does the same).
    let t = &p[20..];
    if fold(sum(
        t,
        pseudo_header_sum(&p[12..16], &p[16..20], PROTO_TCP, t.len() as u16),
    )) != 0xffff
    {
        return None;
    }
    Some(TcpSeg {
        hlen: 20 + th,
        payload: p.len() - 20 - th,
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        psh: flags & TCP_PSH != 0,
    })
}

/// Whether `b` continues the flow of `a` for GRO: same addresses, ports,
/// ToS, DF, TTL, ack, header length, options, window and flags except PSH.
fn same_flow(a: &[u8], b: &[u8], hlen: usize) -> bool {
    a[1] == b[1]
        && a[6] >> 5 == b[6] >> 5
        && a[8] == b[8]
        && a[12..20] == b[12..20]
        && a[20..24] == b[20..24] // ports
        && a[28..33] == b[28..33] // ack, data offset
        && (a[33] & !TCP_PSH) == (b[33] & !TCP_PSH)
        && a[34..36] == b[34..36] // window
        && a[40..hlen] == b[40..hlen] // options
}

/// Length of the run of packets starting at `pkts[0]` that can be coalesced
/// into one super-packet (1 when it cannot be coalesced with anything).
/// `pkts` yields each packet's bytes.
pub fn coalesce_run<'a>(pkts: impl IntoIterator<Item = &'a [u8]>) -> usize {
    let mut it = pkts.into_iter();
    let Some(first) = it.next() else { return 0 };
    let Some(f) = tcp_segment(first) else {
        return 1;
    };
    if f.psh {
        return 1;
    }
    let gso = f.payload;
    let mut n = 1;
    let mut total = first.len();
    let mut next_seq = f.seq.wrapping_add(gso as u32);
    for p in it {
        if n == MAX_GSO_SEGMENTS || p.len() < f.hlen || !same_flow(first, p, f.hlen) {
            break;
        }
        let Some(s) = tcp_segment(p) else { break };
        if s.seq != next_seq || s.payload > gso || total + s.payload > MAX_PACKET {
            break;
        }
        n += 1;
        total += s.payload;
        next_seq = next_seq.wrapping_add(s.payload as u32);
        // A short segment or PSH ends a run.
        if s.payload < gso || s.psh {
            break;
        }
    }
    n
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
    /// (first packet, packet count) of each item, in output order.
    items: Vec<(usize, usize)>,
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
                if p.len() >= 40 && p[0] == 0x45 && p[9] == PROTO_TCP {
                    self.open.retain(|r| packet(r.head)[12..24] != p[12..24]);
                }
                self.items.push((i, 1));
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
            self.items.push((i, 1));
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

    /// The packets of item `k`, in order.
    pub fn item(&self, k: usize) -> GroItem<'_> {
        let (head, count) = self.items[k];
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
/// a run found by [`coalesce_run`] into `out` (GSO_TCPV4, NEEDS_CSUM with
/// the pseudo-header sum in the TCP checksum field). The payloads follow
/// unchanged, each packet's bytes after `hlen`. Returns (bytes written,
/// hlen).
pub fn coalesce_header<'a, I>(run: I, out: &mut [u8]) -> Result<(usize, usize), OffloadError>
where
    I: Iterator<Item = &'a [u8]> + Clone,
{
    let first = run.clone().next().ok_or(OffloadError::BadPacket)?;
    let seg = tcp_segment(first).ok_or(OffloadError::BadPacket)?;
    let h = seg.hlen;
    let mut len = h;
    let mut last_psh = false;
    for p in run {
        if p.len() < h {
            return Err(OffloadError::BadPacket);
        }
        len += p.len() - h;
        last_psh = p[33] & TCP_PSH != 0;
    }
    if len > MAX_PACKET || out.len() < VNET_HDR_LEN + h {
        return Err(OffloadError::NoRoom);
    }
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: h as u16,
        gso_size: seg.payload as u16,
        csum_start: 20,
        csum_offset: 16,
    }
    .encode(out);
    let o = &mut out[VNET_HDR_LEN..VNET_HDR_LEN + h];
    o.copy_from_slice(&first[..h]);
    if last_psh {
        o[33] |= TCP_PSH;
    }
    o[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    o[10] = 0;
    o[11] = 0;
    let ck = !fold(sum(&o[..20], 0));
    o[10..12].copy_from_slice(&ck.to_be_bytes());
    let ps = fold(pseudo_header_sum(
        &o[12..16],
        &o[16..20],
        PROTO_TCP,
        (len - 20) as u16,
    ));
    o[36..38].copy_from_slice(&ps.to_be_bytes());
    Ok((VNET_HDR_LEN + h, h))
}

/// Builds the whole super-packet of a run into `out` (one copy), vnet
/// header first. Returns the bytes written.
pub fn coalesce<'a, I>(run: I, out: &mut [u8]) -> Result<usize, OffloadError>
where
    I: Iterator<Item = &'a [u8]> + Clone,
{
    let (mut at, h) = coalesce_header(run.clone(), out)?;
    for p in run {
        let d = &p[h..];
        if out.len() < at + d.len() {
            return Err(OffloadError::NoRoom);
        }
        out[at..at + d.len()].copy_from_slice(d);
        at += d.len();
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::checksum;

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

    fn segments(out: &[u8], s: Split) -> Vec<&[u8]> {
        (0..s.count)
            .map(|k| &out[k * s.seg_len..((k + 1) * s.seg_len).min(s.total)])
            .collect()
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
        let p = tso_packet(&payload, 1000, 12, TCP_ACK | TCP_PSH);
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
            let t = &seg[20..];
            assert_eq!(
                fold(sum(
                    t,
                    pseudo_header_sum(&seg[12..16], &seg[16..20], 6, t.len() as u16)
                )),
                0xffff,
                "TCP checksum of segment {k}"
            );
            assert_eq!(
                u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
                1000 + (k as u32) * 1408
            );
            assert_eq!(t[13] & TCP_PSH != 0, k == 7, "PSH only on the last");
            data.extend_from_slice(&t[32..]);
        }
        assert_eq!(data, payload);
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
        let t = tso_packet(&[1; 3000], 1, 0, TCP_ACK);
        assert_eq!(
            gso_split(&t, &uso_hdr(1000), &mut out),
            Err(OffloadError::GsoType(GSO_UDP_L4))
        );
        assert!(gso_split(&p, &tso_hdr(&t, 1000), &mut out).is_err());
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
        let p = tso_packet(&[1; 3000], 1, 0, TCP_ACK);
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
        let p0 = tso_packet(&[9; 100], 5, 0, TCP_ACK);
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
        let p = tso_packet(&payload, 0, 12, TCP_ACK);
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
        let syn = tso_packet(&[1; 10], 0, 0, TCP_SYN | TCP_ACK);
        assert_eq!(coalesce_run([&syn[..], &syn[..]]), 1);
        let psh = tso_packet(&[1; 10], 0, 0, TCP_PSH | TCP_ACK);
        assert_eq!(coalesce_run([&psh[..], segs[0]]), 1);
        assert_eq!(coalesce_run(std::iter::empty()), 0);
    }

    /// The segments of one flow: `len` payload bytes (a pattern keyed by
    /// `flow`) cut at `gso`, source port 40000 + flow.
    fn flow_segments(flow: usize, len: usize, gso: u16, opts: usize) -> Vec<Vec<u8>> {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + flow * 31 + 1) as u8).collect();
        let mut p = tso_packet(&payload, 1000 * flow as u32, opts, TCP_ACK);
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
        assert_eq!(coalesce_run(batch.iter().copied()), 1);
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
            let flags = TCP_ACK | if psh { TCP_PSH } else { 0 };
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
