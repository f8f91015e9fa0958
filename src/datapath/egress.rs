//! TUN → UDP: read a batch from the TUN, route each packet, cut
//! super-packets into segments, put the backend's prefix before each, and
//! send runs to one peer as UDP GSO messages. ICMP errors for what cannot
//! be forwarded go back into the TUN.

use super::batch::{Buf, Mmsg, Slots, BATCH, OFFLOAD_BATCH, SLOT};
use super::offload::{
    self, SegmentPiece, Segments, VnetHdr, GSO_NONE, MAX_GSO_SEGMENTS, VNET_HDR_LEN,
};
use super::tun::Tun;
use super::{Drain, Worker};
use crate::forward::{egress, Counters, DropReason, Egress, Tally};
use crate::wire::{self, Ipv4Packet};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most UDP payload bytes one GSO send may carry (the IPv4 64 KB limit,
/// less headers, with a margin).
const GSO_MAX_BYTES: usize = 65_000;

/// Reads up to `slots.count()` packets from the TUN without blocking. An
/// error other than "nothing more now" is the TUN gone (deleted under us:
/// EBADFD) or broken: returned, so the thread ends instead of spinning on a
/// descriptor that polls readable forever.
fn read_tun(tun: &Tun, slots: &mut Slots) -> io::Result<usize> {
    let mut n = 0;
    while n < slots.count() {
        match tun.read(slots.slot_mut(n)) {
            Ok(len) => {
                slots.len[n] = len;
                n += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if n > 0 => {
                tracing::debug!(error = %e, "reading the TUN failed after {n} packets");
                break;
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("reading the TUN: {e}"))),
        }
    }
    Ok(n)
}

/// What one egress thread needs to answer with ICMP errors (the rate
/// limit is the data path's, shared by every worker).
struct Icmp {
    out: [u8; wire::ICMP_ERROR_MAX],
}

impl Icmp {
    fn new() -> Self {
        Icmp {
            out: [0u8; wire::ICMP_ERROR_MAX],
        }
    }
}

/// Answers a packet we cannot forward with an ICMP error into the TUN,
/// within the rate limit.
fn icmp_reply(w: &Worker, offender: &[u8], answer: (u8, u8), icmp: &mut Icmp, t: &mut Tally) {
    let allowed = w
        .shared
        .icmp_limit
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .allow(Instant::now());
    if !allowed {
        t.icmp_ratelimited += 1;
        return;
    }
    let out = &mut icmp.out;
    let offender = Ipv4Packet::new_unchecked(offender);
    if let Some(len) = wire::build_icmp_error(&offender, answer.0, answer.1, w.shared.icmp_src, out)
    {
        if w.tun_write(&out[..len]).is_ok() {
            t.icmp_sent += 1;
        }
    }
}

/// The ICMP answer for an egress verdict that is not a send, counting the drop.
fn unsent(v: Egress, t: &mut Tally) -> Option<(u8, u8)> {
    match v {
        Egress::Send(_) => None,
        Egress::Drop(r) => {
            t.drop(r);
            None
        }
        Egress::Unreachable => {
            t.drop(DropReason::NoRoute);
            Some((wire::ICMP_DEST_UNREACH, wire::ICMP_NET_UNREACH))
        }
        Egress::TimeExceeded => {
            t.drop(DropReason::Ttl);
            Some((wire::ICMP_TIME_EXCEEDED, wire::ICMP_EXC_TTL))
        }
    }
}

/// Segments whose headers are built and queued at a time: one GSO send's worth.
const CHUNK: usize = MAX_GSO_SEGMENTS;
/// Bytes of segment headers built per batch before it must be flushed:
/// 16 chunks of the longest header.
const HEADER_AREA: usize = 16 * CHUNK * wire::MAX_HEADER_LEN;
/// Messages and iovecs per egress batch with offloads.
const OFFLOAD_MSGS: usize = 16 * CHUNK;

/// The egress drain of a worker: reads the TUN until it is empty (or a
/// batch is not full) and sends what it read, with one loop for every kind
/// of packet: each becomes its [`Segments`] — a plain packet one segment
/// sent as it is, a TSO/USO super-packet (with a vnet TUN) MTU-sized
/// segments gathered from a freshly built header and their slice of the
/// payload, without copying it. A run of segments to one peer goes out as
/// one UDP GSO message (or one message per segment without GSO). A
/// super-packet of any size (a small MSS makes over a thousand segments)
/// is handled a chunk at a time; the batch is flushed whenever its message
/// slots, iovecs or header area would overflow.
pub(super) fn tun_to_udp(w: &Worker) -> Drain<'_> {
    let vnet = if w.tun.vnet_hdr() { VNET_HDR_LEN } else { 0 };
    // The backend's prefix (VXLAN + Ethernet) is built once per chunk in
    // the header area and gathered before every segment of the chunk.
    let encap = w.shared.encap;
    let pre = encap.prefix_len();
    let (batch, msgs, area) = if vnet > 0 {
        (
            OFFLOAD_BATCH,
            OFFLOAD_MSGS,
            HEADER_AREA + OFFLOAD_MSGS * pre,
        )
    } else {
        (BATCH, BATCH, BATCH * pre)
    };
    // Iovecs per segment: its prefix, if any, and its header + payload.
    let extra = usize::from(pre > 0);
    let mut rx = Slots::new(batch, SLOT);
    let mut headers = vec![0u8; area];
    let mut hoff = 0;
    let mut mmsg = Mmsg::new(msgs, (2 + extra) * msgs);
    let mut icmp = Icmp::new();
    let mut gso_off = GsoOff::new(w.shared.counters.clone());
    let sock = w.tx.as_raw_fd();
    // wireguard: each segment is gathered into `plain`, sealed into
    // `sealed`, and runs of sealed datagrams to one peer go out as one GSO
    // message from there.
    let wg = w.shared.wg.clone();
    let mut sealed = Sealer::new(wg.is_some(), if vnet > 0 { CHUNK } else { BATCH });
    Box::new(move || {
        let mut got = 0;
        loop {
            let n = read_tun(&w.tun, &mut rx)?;
            if n == 0 {
                break;
            }
            got += n;
            let mut t = Tally {
                tun_rx_packets: n as u64,
                ..Tally::default()
            };
            let routes = w.shared.routes.load();
            for i in 0..n {
                let start = rx.start(i) + vnet;
                let raw = rx.packet_mut(i);
                let hdr = if vnet > 0 {
                    match VnetHdr::decode(raw) {
                        Ok(h) => h,
                        Err(_) => {
                            t.drop(DropReason::Malformed);
                            continue;
                        }
                    }
                } else {
                    VnetHdr::default()
                };
                let pkt = &mut raw[vnet..];
                if hdr.gso_type == GSO_NONE
                    && hdr.flags & offload::F_NEEDS_CSUM != 0
                    && offload::complete_checksum(pkt, &hdr).is_err()
                {
                    t.drop(DropReason::Malformed);
                    continue;
                }
                let v = egress(pkt, &routes);
                let Egress::Send(peer) = v else {
                    if let Some(answer) = unsent(v, &mut t) {
                        icmp_reply(w, pkt, answer, &mut icmp, &mut t);
                    }
                    continue;
                };
                let wg_peer = match &wg {
                    Some(wg) => match wg.peer(peer.addr) {
                        Some(p) => Some(p),
                        None => {
                            t.drop(DropReason::NoRoute);
                            continue;
                        }
                    },
                    None => None,
                };
                let Ok(segs) = Segments::of(pkt, &hdr) else {
                    t.drop(DropReason::Malformed);
                    continue;
                };
                let overhead = pre
                    + if wg.is_some() {
                        crate::wireguard::DATA_OVERHEAD
                    } else {
                        0
                    };
                // Towards a path narrower than our segments, TCP is cut to it.
                let limit = gso_off.limit(*peer.addr.ip());
                let segs = match limit {
                    Some(Limit::Fits(max)) => segs.fit(max.saturating_sub(overhead)),
                    _ => segs,
                };
                t.udp_tx_bytes += segs.total() as u64;
                let dgram = segs.seg_len() + overhead;
                // One GSO send carries at most 64 segments and 64 KB.
                let per = if w.caps.udp_gso && segs.count() > 1 && Limit::allows(limit, dgram) {
                    MAX_GSO_SEGMENTS.min(GSO_MAX_BYTES / dgram).max(1)
                } else {
                    1
                };
                let whole = matches!(segs, Segments::Whole(_));
                let mut first = 0;
                while first < segs.count() {
                    let chunk = first..(first + CHUNK).min(segs.count());
                    let bytes = pre + segs.header_bytes(chunk.len());
                    let pieces = segs.pieces_for(chunk.len()) + extra * chunk.len();
                    let room = if wg.is_some() {
                        mmsg.has_room_for(chunk.len(), chunk.len())
                            && sealed.has_room(chunk.len() * dgram)
                    } else {
                        mmsg.has_room_for(chunk.len().div_ceil(per), pieces)
                    };
                    if !room || hoff + bytes > headers.len() {
                        let aux = sealed.aux_or(&mut headers);
                        flush(&mut mmsg, sock, rx.bytes_mut(), aux, &mut t);
                        sealed.clear();
                        gso_off.refused(&mmsg.gso_refused, probe_mtu);
                        hoff = 0;
                    }
                    let pkt = &rx.packet(i)[vnet..];
                    let area = &mut headers[hoff..hoff + bytes];
                    encap.write_prefix(peer.mac, area);
                    segs.write_headers(pkt, chunk.clone(), &mut area[pre..])
                        .expect("room checked above");
                    let prefix = (pre > 0).then_some((Buf::Aux, hoff, pre));
                    let hdrs = hoff + pre;
                    if let Some(wp) = &wg_peer {
                        let pieces = |c: usize| {
                            segs.pieces(c..c + 1, chunk.start).map(|p| match p {
                                SegmentPiece::Header(at, len) => (Buf::Aux, hdrs + at, len),
                                SegmentPiece::Payload(r) => (Buf::Main, start + r.start, r.len()),
                            })
                        };
                        sealed.seal_chunk(
                            w,
                            wp,
                            chunk.clone(),
                            pieces,
                            (rx.bytes(), &headers),
                            per,
                            &mut mmsg,
                            &mut t,
                        );
                        hoff += bytes;
                        first = chunk.end;
                        continue;
                    }
                    for c in chunk.clone().step_by(per) {
                        let run = c..(c + per).min(chunk.end);
                        let gso = if run.len() > 1 { dgram as u16 } else { 0 };
                        // Each segment: [prefix] header payload, or
                        // [prefix] packet for a packet sent whole.
                        let pieces = segs.pieces(run, chunk.start).flat_map(|p| {
                            let (starts, piece) = match p {
                                SegmentPiece::Header(at, len) => (true, (Buf::Aux, hdrs + at, len)),
                                SegmentPiece::Payload(r) => {
                                    (whole, (Buf::Main, start + r.start, r.len()))
                                }
                            };
                            prefix.filter(|_| starts).into_iter().chain([piece])
                        });
                        mmsg.queue_gather(pieces, peer.addr, gso);
                    }
                    hoff += bytes;
                    first = chunk.end;
                }
            }
            flush(
                &mut mmsg,
                sock,
                rx.bytes_mut(),
                sealed.aux_or(&mut headers),
                &mut t,
            );
            sealed.clear();
            gso_off.refused(&mmsg.gso_refused, probe_mtu);
            hoff = 0;
            w.shared.counters.egress.add(&t);
            w.shared.counters.tx_batch(n);
            if n < rx.count() {
                break;
            }
        }
        Ok(got)
    })
}

/// The path MTU towards a peer, for [`GsoOff::refused`].
fn probe_mtu(to: SocketAddrV4) -> Option<usize> {
    super::udp::path_mtu(to)
        .map_err(|e| tracing::debug!(peer = %to, error = %e, "no path MTU"))
        .ok()
}

/// Sends what is queued, counting datagrams sent and failed.
fn flush(mmsg: &mut Mmsg, sock: RawFd, main: &mut [u8], aux: &mut [u8], t: &mut Tally) {
    if mmsg.queued() > 0 {
        let r = mmsg.send(sock, main, aux);
        t.udp_tx_packets += r.sent as u64;
        t.drop_n(DropReason::SendError, r.failed as u64);
        t.gso_fallbacks += r.fallbacks as u64;
    }
}

/// How long what a refused GSO send taught about a peer holds: as long as
/// the kernel keeps a learned path MTU (`ip_rt_mtu_expires`). Then full-size
/// GSO is tried again, so a path that recovers gets it back.
const GSO_OFF_FOR: Duration = Duration::from_secs(600);

/// The outer headers the kernel puts around each datagram we send.
const OUTER: usize = wire::IPV4_MIN_HEADER + wire::UDP_HEADER;

/// What one worker sends to a peer whose UDP GSO send the kernel refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    /// UDP payloads of up to this many bytes fit the path (its MTU less the
    /// outer IPv4 and UDP headers): TCP super-packets are cut into segments
    /// that fit, and still go out as GSO sends; what cannot be cut smaller
    /// goes as plain datagrams (the kernel fragments them).
    Fits(usize),
    /// Plain datagrams only: refused although the segments fit the path as
    /// the kernel holds it (an IPsec policy, say), or no usable path MTU.
    NoGso,
}

impl Limit {
    /// What a refusal teaches, given what was known (`prev`) and the path
    /// MTU the kernel now holds towards the peer: cut to it if that helps
    /// (first refusal, or the path has narrowed since), else no GSO.
    fn after_refusal(prev: Option<Limit>, path_mtu: Option<usize>) -> Limit {
        match (prev, path_mtu) {
            (None, Some(mtu)) if mtu >= 576 => Limit::Fits(mtu - OUTER),
            (Some(Limit::Fits(max)), Some(mtu)) if mtu >= 576 && mtu - OUTER < max => {
                Limit::Fits(mtu - OUTER)
            }
            _ => Limit::NoGso,
        }
    }

    /// Whether a GSO send of `dgram`-byte datagrams may be tried.
    fn allows(this: Option<Limit>, dgram: usize) -> bool {
        match this {
            None => true,
            Some(Limit::Fits(max)) => dgram <= max,
            Some(Limit::NoGso) => false,
        }
    }
}

/// The peers one worker has seen a UDP GSO send refused to (a path MTU
/// below the segment size, or an IPsec policy that cannot segment), with
/// what it does for them now. Each entry expires.
struct GsoOff {
    until: Vec<(Ipv4Addr, Instant, Limit)>,
    counters: Arc<Counters>,
}

impl GsoOff {
    fn new(counters: Arc<Counters>) -> Self {
        GsoOff {
            until: Vec::new(),
            counters,
        }
    }

    /// What is known about sending GSO to `ip` (`None`: nothing, full size).
    #[inline]
    fn limit(&mut self, ip: Ipv4Addr) -> Option<Limit> {
        if self.until.is_empty() {
            return None;
        }
        let now = Instant::now();
        let before = self.until.len();
        self.until.retain(|&(_, t, _)| t > now);
        let expired = (before - self.until.len()) as u64;
        if expired > 0 {
            self.counters
                .gso_off_peers
                .fetch_sub(expired, Ordering::Relaxed);
        }
        self.until
            .iter()
            .find_map(|&(p, _, l)| (p == ip).then_some(l))
    }

    /// Learns from the peers whose GSO sends were refused: the path MTU
    /// towards each (`path_mtu`), and so whether cutting segments to it is
    /// enough or GSO has to stop.
    fn refused(
        &mut self,
        peers: &[SocketAddrV4],
        path_mtu: impl Fn(SocketAddrV4) -> Option<usize>,
    ) {
        for p in peers {
            let ip = *p.ip();
            let at = self.until.iter().position(|&(q, _, _)| q == ip);
            let prev = at.map(|i| self.until[i].2);
            if prev == Some(Limit::NoGso) {
                continue;
            }
            let mtu = path_mtu(*p);
            let limit = Limit::after_refusal(prev, mtu);
            match limit {
                Limit::Fits(max) => {
                    tracing::warn!(peer = %ip, path_mtu = max + OUTER, "the kernel refused a UDP GSO send: the path MTU to this peer is below the segment size; TCP is cut into segments that fit it, GSO goes on, and plain datagrams carry the rest, for {} s", GSO_OFF_FOR.as_secs())
                }
                Limit::NoGso => {
                    tracing::warn!(peer = %ip, "the kernel refused a UDP GSO send of datagrams that fit the path (an IPsec policy, say); resent as plain datagrams, and GSO stays off for this peer for {} s", GSO_OFF_FOR.as_secs())
                }
            }
            let until = Instant::now() + GSO_OFF_FOR;
            match at {
                Some(i) => self.until[i] = (ip, until, limit),
                None => {
                    self.until.push((ip, until, limit));
                    self.counters.gso_off_peers.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The wireguard step of the egress loop: segments sealed one after the
/// other into one buffer, so a run of them to one peer is one GSO message.
struct Sealer {
    /// Sealed datagrams, queued as `Buf::Aux` pieces (empty without wireguard).
    out: Vec<u8>,
    used: usize,
    /// One segment's plaintext, gathered from its header and payload.
    plain: Vec<u8>,
}

impl Sealer {
    fn new(on: bool, per_batch: usize) -> Self {
        let (out, plain) = if on {
            (
                vec![0u8; per_batch * (SLOT + crate::wireguard::DATA_OVERHEAD)],
                vec![0u8; SLOT],
            )
        } else {
            (Vec::new(), Vec::new())
        };
        Sealer {
            out,
            used: 0,
            plain,
        }
    }

    fn has_room(&self, bytes: usize) -> bool {
        self.used + bytes <= self.out.len()
    }

    fn clear(&mut self) {
        self.used = 0;
    }

    /// The buffer `Buf::Aux` pieces are in: ours with wireguard, else
    /// the header area.
    fn aux_or<'a>(&'a mut self, headers: &'a mut [u8]) -> &'a mut [u8] {
        if self.out.is_empty() {
            headers
        } else {
            &mut self.out
        }
    }

    /// Seals the segments `chunk` (each gathered from `pieces(c)` out of
    /// `bufs`: main, aux) for `peer` and queues them, equal-sized runs of up
    /// to `per` as one GSO message. A handshake initiation (no session
    /// yet; the packet waits in the peer's queue) goes out at once.
    #[allow(clippy::too_many_arguments)]
    fn seal_chunk<I: Iterator<Item = (Buf, usize, usize)>>(
        &mut self,
        w: &Worker,
        peer: &crate::wireguard::WgPeer,
        chunk: std::ops::Range<usize>,
        pieces: impl Fn(usize) -> I,
        bufs: (&[u8], &[u8]),
        per: usize,
        mmsg: &mut Mmsg,
        t: &mut Tally,
    ) {
        use crate::wireguard::{seal, Sealed};
        let mut tunn = peer.lock();
        // The open run: (start in `out`, datagrams, each one's length).
        let mut run: Option<(usize, usize, usize)> = None;
        let queue = |mmsg: &mut Mmsg, (at, n, len): (usize, usize, usize), total: usize| {
            let gso = if n > 1 { len as u16 } else { 0 };
            mmsg.queue_gather([(Buf::Aux, at, total)], peer.endpoint, gso);
        };
        let mut run_bytes = 0;
        for c in chunk {
            let mut n = 0;
            for (buf, at, len) in pieces(c) {
                let src = if buf == Buf::Main { bufs.0 } else { bufs.1 };
                self.plain[n..n + len].copy_from_slice(&src[at..at + len]);
                n += len;
            }
            let at = self.used;
            match seal(peer, &mut tunn, &self.plain[..n], &mut self.out[at..]) {
                Sealed::Data(len) => {
                    self.used += len;
                    match run {
                        Some((s, k, l)) if k < per && len <= l && run_bytes == k * l => {
                            run = Some((s, k + 1, l));
                            run_bytes += len;
                        }
                        open => {
                            if let Some(r) = open {
                                queue(mmsg, r, run_bytes);
                            }
                            run = Some((at, 1, len));
                            run_bytes = len;
                        }
                    }
                }
                Sealed::Handshake(len) => {
                    if w.tx.send_to(&self.out[at..at + len], peer.endpoint).is_ok() {
                        t.udp_tx_packets += 1;
                    }
                }
                Sealed::Waiting => {}
                Sealed::Full => t.drop(DropReason::NoSession),
            }
        }
        if let Some(r) = run {
            queue(mmsg, r, run_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_teaches_the_path_mtu_then_a_second_one_stops_gso() {
        // First refusal: the segments are cut to the path and GSO goes on.
        let first = Limit::after_refusal(None, Some(1400));
        assert_eq!(first, Limit::Fits(1372));
        assert!(Limit::allows(Some(first), 1372));
        assert!(
            !Limit::allows(Some(first), 1373),
            "a datagram over the path"
        );
        // Refused again: a path narrowed since is followed…
        assert_eq!(
            Limit::after_refusal(Some(first), Some(1300)),
            Limit::Fits(1272)
        );
        // …but datagrams that fit refused all the same (IPsec, say) stop
        // GSO: plain datagrams.
        let second = Limit::after_refusal(Some(first), Some(1400));
        assert_eq!(second, Limit::NoGso);
        assert!(!Limit::allows(Some(second), 100));
        // No path MTU, or one below IPv4's 576 minimum: no guessing.
        assert_eq!(Limit::after_refusal(None, None), Limit::NoGso);
        assert_eq!(Limit::after_refusal(None, Some(500)), Limit::NoGso);
        assert!(Limit::allows(None, 65_000), "nothing known: full size");
    }

    #[test]
    fn the_path_mtu_comes_from_the_kernel() {
        // Loopback's MTU, whatever the machine sets it to (IPv4 caps a
        // route's MTU at 65535).
        let mtu = probe_mtu(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9)).expect("IP_MTU on loopback");
        let lo: usize = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(mtu, lo.min(65_535));
    }
}
