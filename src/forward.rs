//! Per-packet forwarding decisions for both directions, without I/O, and the
//! counters every drop path feeds.

use crate::routes::{Hop, RouteSnapshot};
use crate::wire::{Ipv4Packet, WireError};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a packet was not forwarded. The counters are an array indexed by
/// this enum: a new reason is one variant here and one line in [`ALL`](DropReason::ALL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not IPv4 (e.g. an IPv6 packet the kernel routed into the TUN).
    NotIpv4,
    /// Not a well-formed IPv4 packet (short, bad IHL, lying length, bad checksum).
    Malformed,
    /// TTL would reach zero.
    Ttl,
    /// No lease covers the destination.
    NoRoute,
    /// Received from an address that is not the PublicIP of the peer whose
    /// lease covers the inner source (or from no peer at all).
    Spoofed,
    /// Received for a destination outside our own subnet (no reflection).
    NotLocal,
    /// The kernel refused to send it.
    SendError,
    /// The kernel refused the write to the TUN.
    TunWriteError,
    /// A VXLAN datagram for another VNI.
    WrongVni,
    /// A VXLAN frame for another Ethernet address than our VtepMAC.
    WrongMac,
    /// wireguard: a datagram no session of ours authenticates (garbage, a
    /// replay, an unknown receiver index, a handshake from an unknown key
    /// or with the wrong PSK).
    Unauthenticated,
    /// wireguard: a packet for a peer whose handshake has not completed,
    /// when the packets already waiting for it fill its queue.
    NoSession,
}

impl DropReason {
    /// Every reason, with its `reason` label on `/metrics`, in counter order.
    pub const ALL: [(DropReason, &'static str); 12] = [
        (DropReason::NoRoute, "no_route"),
        (DropReason::Ttl, "ttl"),
        (DropReason::Malformed, "malformed"),
        (DropReason::NotIpv4, "not_ipv4"),
        (DropReason::Spoofed, "spoofed"),
        (DropReason::NotLocal, "not_local"),
        (DropReason::SendError, "send_error"),
        (DropReason::TunWriteError, "tun_write_error"),
        (DropReason::WrongVni, "wrong_vni"),
        (DropReason::WrongMac, "wrong_mac"),
        (DropReason::Unauthenticated, "unauthenticated"),
        (DropReason::NoSession, "no_session"),
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// This reason's index into the counter arrays.
    pub const fn index(self) -> usize {
        match self {
            DropReason::NoRoute => 0,
            DropReason::Ttl => 1,
            DropReason::Malformed => 2,
            DropReason::NotIpv4 => 3,
            DropReason::Spoofed => 4,
            DropReason::NotLocal => 5,
            DropReason::SendError => 6,
            DropReason::TunWriteError => 7,
            DropReason::WrongVni => 8,
            DropReason::WrongMac => 9,
            DropReason::Unauthenticated => 10,
            DropReason::NoSession => 11,
        }
    }

    pub fn label(self) -> &'static str {
        Self::ALL[self.index()].1
    }
}

/// What to do with a packet read from the TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// TTL already decremented; send the packet unchanged otherwise to the peer.
    Send(Hop),
    /// No lease covers the destination: answer with ICMP net unreachable.
    Unreachable,
    /// TTL expired here: answer with ICMP time exceeded.
    TimeExceeded,
    Drop(DropReason),
}

/// What to do with a datagram received on the UDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress {
    /// TTL decremented; write the packet to the TUN.
    Deliver,
    Drop(DropReason),
}

fn wire_reason(e: WireError) -> DropReason {
    match e {
        WireError::Version => DropReason::NotIpv4,
        _ => DropReason::Malformed,
    }
}

/// TUN → UDP: route lookup and TTL, as flannel's `tun_to_udp`. The kernel
/// wrote this packet, so its header checksum is trusted.
#[inline]
pub fn egress(pkt: &mut [u8], routes: &RouteSnapshot) -> Egress {
    let mut p = match Ipv4Packet::new_checked(pkt) {
        Ok(p) => p,
        Err(e) => return Egress::Drop(wire_reason(e)),
    };
    let Some(peer) = routes.lookup(p.dst()) else {
        return Egress::Unreachable;
    };
    if p.ttl() <= 1 {
        return Egress::TimeExceeded;
    }
    p.decrement_ttl();
    Egress::Send(peer)
}

/// UDP → TUN: validate, check the sender, decrement TTL, as flannel's
/// `udp_to_tun` plus what flannel lacks: the datagram must come from the
/// PublicIP of the peer whose lease covers the inner source (unless
/// `accept_unknown`), and the inner destination must be in our own subnet.
/// Flannel drops at TTL 1→0 but lets TTL 0 wrap to 255; we drop both.
#[inline]
pub fn ingress(
    pkt: &mut [u8],
    from: Ipv4Addr,
    routes: &RouteSnapshot,
    accept_unknown: bool,
) -> Ingress {
    let mut p = match Ipv4Packet::new_checked(pkt) {
        Ok(p) => p,
        Err(e) => return Ingress::Drop(wire_reason(e)),
    };
    if !p.header_checksum_ok() {
        return Ingress::Drop(DropReason::Malformed);
    }
    if !routes.is_local(p.dst()) {
        return Ingress::Drop(DropReason::NotLocal);
    }
    if !accept_unknown
        && routes
            .lookup(p.src())
            .is_none_or(|peer| *peer.addr.ip() != from)
    {
        return Ingress::Drop(DropReason::Spoofed);
    }
    if p.ttl() <= 1 {
        return Ingress::Drop(DropReason::Ttl);
    }
    p.decrement_ttl();
    Ingress::Deliver
}

/// One direction's counters. Workers add a batch at a time, so the
/// atomics are touched once per batch.
#[derive(Debug, Default)]
pub struct Totals {
    pub tun_rx_packets: AtomicU64,
    pub udp_tx_packets: AtomicU64,
    pub udp_tx_bytes: AtomicU64,
    pub udp_rx_packets: AtomicU64,
    pub udp_rx_bytes: AtomicU64,
    pub tun_tx_packets: AtomicU64,
    pub icmp_sent: AtomicU64,
    /// Indexed by [`DropReason::index`].
    pub drops: [AtomicU64; DropReason::COUNT],
    pub gso_fallbacks: AtomicU64,
    pub icmp_ratelimited: AtomicU64,
    pub arp_replies: AtomicU64,
    /// Receive calls on the UDP socket that failed (ingress only).
    pub rx_errors: AtomicU64,
}

/// Data-path counters, shared with the control plane and the metrics:
/// egress (TUN → UDP) and ingress (UDP → TUN) kept apart, so that a drop
/// reason says where it happened.
#[derive(Debug, Default)]
pub struct Counters {
    pub egress: Totals,
    pub ingress: Totals,
    /// Batch sizes (packets per TUN-read batch / per receive batch), in
    /// buckets of ≤ 1, 2, 4, 8, 16, 32, 64 and more.
    pub tx_batches: [AtomicU64; BATCH_BUCKETS],
    pub rx_batches: [AtomicU64; BATCH_BUCKETS],
    /// Packets in all batches (the histograms' sums).
    pub tx_batch_sum: AtomicU64,
    pub rx_batch_sum: AtomicU64,
    /// Peers for which UDP GSO is off for now (after a refused GSO send),
    /// summed over the workers.
    pub gso_off_peers: AtomicU64,
    /// Datagrams each worker received (the first [`WORKER_METRICS`]
    /// workers; later ones count into the last): how evenly the peers'
    /// flows spread over the workers.
    pub worker_rx: [AtomicU64; WORKER_METRICS],
    /// Workers running (so many entries of `worker_rx` are reported).
    pub workers: AtomicU64,
}

/// Workers counted apart in [`Counters::worker_rx`].
pub const WORKER_METRICS: usize = 32;

/// Upper bounds of the batch-size histogram buckets (the last is +Inf).
pub const BATCH_BOUNDS: [f64; BATCH_BUCKETS - 1] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
pub const BATCH_BUCKETS: usize = 8;

fn bucket(n: usize) -> usize {
    BATCH_BOUNDS
        .iter()
        .position(|&b| n as f64 <= b)
        .unwrap_or(BATCH_BUCKETS - 1)
}

/// A worker's per-batch tally, flushed into [`Counters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub tun_rx_packets: u64,
    pub udp_tx_packets: u64,
    pub udp_tx_bytes: u64,
    pub udp_rx_packets: u64,
    pub udp_rx_bytes: u64,
    pub tun_tx_packets: u64,
    pub icmp_sent: u64,
    /// Indexed by [`DropReason::index`].
    pub drops: [u64; DropReason::COUNT],
    /// UDP GSO sends the kernel refused (segment above the path MTU, an
    /// IPsec policy, …) and that were resent as plain datagrams.
    pub gso_fallbacks: u64,
    /// ICMP errors not sent because the rate limit was reached.
    pub icmp_ratelimited: u64,
    /// ARP requests for our VTEP address answered (vxlan backend).
    pub arp_replies: u64,
}

impl Tally {
    pub fn drop(&mut self, r: DropReason) {
        self.drops[r.index()] += 1;
    }

    pub fn drop_n(&mut self, r: DropReason, n: u64) {
        self.drops[r.index()] += n;
    }

    /// Packets dropped for reason `r`.
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r.index()]
    }
}

macro_rules! counter_fields {
    ($m:ident) => {
        $m!(
            tun_rx_packets,
            udp_tx_packets,
            udp_tx_bytes,
            udp_rx_packets,
            udp_rx_bytes,
            tun_tx_packets,
            icmp_sent,
            gso_fallbacks,
            icmp_ratelimited,
            arp_replies
        )
    };
}

impl Totals {
    pub fn add(&self, t: &Tally) {
        macro_rules! add {
            ($($f:ident),*) => { $( if t.$f != 0 { self.$f.fetch_add(t.$f, Ordering::Relaxed); } )* };
        }
        counter_fields!(add);
        for (c, v) in self.drops.iter().zip(t.drops) {
            if v != 0 {
                c.fetch_add(v, Ordering::Relaxed);
            }
        }
    }

    pub fn snapshot(&self) -> Tally {
        macro_rules! get {
            ($($f:ident),*) => { Tally { $( $f: self.$f.load(Ordering::Relaxed), )* drops: std::array::from_fn(|i| self.drops[i].load(Ordering::Relaxed)) } };
        }
        counter_fields!(get)
    }
}

impl Counters {
    /// Both directions summed.
    pub fn snapshot(&self) -> Tally {
        let (a, b) = (self.egress.snapshot(), self.ingress.snapshot());
        macro_rules! sum {
            ($($f:ident),*) => { Tally { $( $f: a.$f + b.$f, )* drops: std::array::from_fn(|i| a.drops[i] + b.drops[i]) } };
        }
        counter_fields!(sum)
    }

    /// Records one batch of `n` packets read from the TUN.
    pub fn tx_batch(&self, n: usize) {
        self.tx_batches[bucket(n)].fetch_add(1, Ordering::Relaxed);
        self.tx_batch_sum.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records one batch of `n` datagrams received.
    /// Datagrams worker `k` received.
    pub fn worker_rx(&self, k: usize, n: u64) {
        self.worker_rx[k.min(WORKER_METRICS - 1)].fetch_add(n, Ordering::Relaxed);
    }

    pub fn rx_batch(&self, n: usize) {
        self.rx_batches[bucket(n)].fetch_add(1, Ordering::Relaxed);
        self.rx_batch_sum.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A token bucket for the ICMP errors the data path generates, as the
/// kernel limits its own (`icmp_msgs_per_sec` 1000, burst 50): a flood of
/// packets to an unleased subnet, or with TTL 1, must not become a flood of
/// ICMP back into the host. Time is passed in, so it is tested without clocks.
#[derive(Debug, Clone)]
pub struct IcmpLimit {
    per_sec: u32,
    burst: u32,
    tokens: f64,
    last: Option<std::time::Instant>,
}

impl IcmpLimit {
    pub const PER_SEC: u32 = 1000;
    pub const BURST: u32 = 50;

    pub fn new(per_sec: u32, burst: u32) -> Self {
        IcmpLimit {
            per_sec,
            burst,
            tokens: burst as f64,
            last: None,
        }
    }

    /// Whether one more ICMP error may be sent at `now`.
    pub fn allow(&mut self, now: std::time::Instant) -> bool {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.per_sec as f64).min(self.burst as f64);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Default for IcmpLimit {
    fn default() -> Self {
        IcmpLimit::new(Self::PER_SEC, Self::BURST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::udp_packet;

    #[test]
    fn icmp_limit_allows_a_burst_then_the_rate() {
        let t0 = std::time::Instant::now();
        let mut l = IcmpLimit::new(1000, 50);
        // A burst of 50 at once, then nothing until tokens come back.
        assert_eq!((0..200).filter(|_| l.allow(t0)).count(), 50);
        assert!(!l.allow(t0));
        // 1000/s: 10 ms buys 10 more.
        let t1 = t0 + std::time::Duration::from_millis(10);
        assert_eq!((0..200).filter(|_| l.allow(t1)).count(), 10);
        // A long pause refills only up to the burst.
        let t2 = t1 + std::time::Duration::from_secs(60);
        assert_eq!((0..200).filter(|_| l.allow(t2)).count(), 50);
        // Over one second of steady offenders, about 1000 + burst pass.
        let mut l = IcmpLimit::new(1000, 50);
        let sent = (0..10_000)
            .filter(|k| l.allow(t0 + std::time::Duration::from_micros(100 * k)))
            .count();
        assert!((1000..=1060).contains(&sent), "{sent}");
    }
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn routes() -> RouteSnapshot {
        RouteSnapshot::new([(
            "10.5.2.0/24".parse().unwrap(),
            SocketAddrV4::new(Ipv4Addr::new(192, 168, 0, 2), 8285),
        )])
    }

    #[test]
    fn egress_routes_and_decrements_ttl() {
        let mut p = udp_packet([10, 5, 1, 0], [10, 5, 2, 7], 64, b"x");
        assert_eq!(
            egress(&mut p, &routes()),
            Egress::Send(SocketAddrV4::new(Ipv4Addr::new(192, 168, 0, 2), 8285).into())
        );
        let v = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert_eq!(v.ttl(), 63);
        assert!(v.header_checksum_ok());
    }

    #[test]
    fn egress_unrouted_ttl_and_garbage() {
        let mut p = udp_packet([10, 5, 1, 0], [10, 5, 3, 7], 64, b"x");
        assert_eq!(egress(&mut p, &routes()), Egress::Unreachable);
        let mut p = udp_packet([10, 5, 1, 0], [10, 5, 2, 7], 1, b"x");
        assert_eq!(egress(&mut p, &routes()), Egress::TimeExceeded);
        let mut v6 = vec![0x60u8; 40];
        assert_eq!(
            egress(&mut v6, &routes()),
            Egress::Drop(DropReason::NotIpv4)
        );
        assert_eq!(
            egress(&mut [0x45; 10], &routes()),
            Egress::Drop(DropReason::Malformed)
        );
    }

    /// Our subnet 10.5.1.0/24; peer 192.168.0.2 owns 10.5.2.0/24.
    fn ingress_routes() -> RouteSnapshot {
        routes().with_local("10.5.1.0/24".parse().unwrap())
    }

    const PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);

    #[test]
    fn ingress_checks_checksum_and_ttl() {
        let r = ingress_routes();
        let mut p = udp_packet([10, 5, 2, 7], [10, 5, 1, 0], 63, b"x");
        assert_eq!(ingress(&mut p, PEER, &r, false), Ingress::Deliver);
        assert_eq!(Ipv4Packet::new_checked(&p[..]).unwrap().ttl(), 62);
        for ttl in [0, 1] {
            let mut p = udp_packet([10, 5, 2, 7], [10, 5, 1, 0], ttl, b"x");
            assert_eq!(
                ingress(&mut p, PEER, &r, false),
                Ingress::Drop(DropReason::Ttl)
            );
        }
        let mut bad = udp_packet([10, 5, 2, 7], [10, 5, 1, 0], 63, b"x");
        bad[10] ^= 0xff;
        assert_eq!(
            ingress(&mut bad, PEER, &r, false),
            Ingress::Drop(DropReason::Malformed)
        );
    }

    #[test]
    fn ingress_rejects_spoofed_senders_and_reflection() {
        let r = ingress_routes();
        let other = Ipv4Addr::new(192, 168, 0, 66);
        // Right inner source, wrong outer sender.
        let mut p = udp_packet([10, 5, 2, 7], [10, 5, 1, 0], 63, b"x");
        assert_eq!(
            ingress(&mut p, other, &r, false),
            Ingress::Drop(DropReason::Spoofed)
        );
        // Inner source that no peer owns, or our own subnet.
        for src in [[10, 5, 9, 7], [10, 5, 1, 9], [8, 8, 8, 8]] {
            let mut p = udp_packet(src, [10, 5, 1, 0], 63, b"x");
            assert_eq!(
                ingress(&mut p, PEER, &r, false),
                Ingress::Drop(DropReason::Spoofed)
            );
        }
        // Destination outside our subnet: never reflected onward.
        for dst in [[10, 5, 2, 9], [10, 5, 3, 1], [1, 1, 1, 1]] {
            let mut p = udp_packet([10, 5, 2, 7], dst, 63, b"x");
            assert_eq!(
                ingress(&mut p, PEER, &r, false),
                Ingress::Drop(DropReason::NotLocal)
            );
        }
        // The NAT escape hatch skips only the sender check.
        let mut p = udp_packet([10, 5, 9, 7], [10, 5, 1, 0], 63, b"x");
        assert_eq!(ingress(&mut p, other, &r, true), Ingress::Deliver);
        let mut p = udp_packet([10, 5, 9, 7], [10, 5, 3, 0], 63, b"x");
        assert_eq!(
            ingress(&mut p, other, &r, true),
            Ingress::Drop(DropReason::NotLocal)
        );
    }

    #[test]
    fn counters_add_tallies() {
        let c = Counters::default();
        let mut t = Tally::default();
        t.drop(DropReason::Ttl);
        t.drop(DropReason::NoRoute);
        t.udp_tx_packets = 3;
        c.egress.add(&t);
        c.ingress.add(&t);
        c.ingress.add(&t);
        let s = c.snapshot();
        assert_eq!(
            (
                s.dropped(DropReason::Ttl),
                s.dropped(DropReason::NoRoute),
                s.udp_tx_packets
            ),
            (3, 3, 9)
        );
        assert_eq!(c.ingress.snapshot().dropped(DropReason::Ttl), 2);
    }
}

#[cfg(test)]
mod reason_tests {
    use super::DropReason;

    #[test]
    fn every_reason_has_its_own_index_and_label() {
        for (i, (r, label)) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
            assert_eq!(r.label(), *label);
        }
        let mut labels: Vec<_> = DropReason::ALL.iter().map(|(_, l)| *l).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), DropReason::COUNT);
    }
}
