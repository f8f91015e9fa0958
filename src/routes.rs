//! The route table the data path reads: an immutable snapshot, swapped
//! atomically by the control plane ([`arc_swap`]), so a lookup takes no lock
//! and never waits for a writer.

use crate::wire::ether::Mac;
use arc_swap::ArcSwap;
use ipnetwork::Ipv4Network;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

/// Where a subnet's packets go: the owner's UDP address and, on the vxlan
/// backend, its VtepMAC (the inner Ethernet destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    pub addr: SocketAddrV4,
    pub mac: Mac,
}

impl From<SocketAddrV4> for Hop {
    fn from(addr: SocketAddrV4) -> Self {
        Hop {
            addr,
            mac: Mac::default(),
        }
    }
}

/// Routes of one prefix length, in an open-addressing hash table
/// (linear probing, load ≤ 1/2) keyed by network address.
#[derive(Debug, Clone)]
struct Group {
    prefix: u8,
    mask: u32,
    nets: Vec<u32>,
    peers: Vec<Hop>,
    /// Index into `nets`/`peers`, or `EMPTY`.
    slots: Vec<u32>,
    shift: u32,
}

const EMPTY: u32 = u32::MAX;

impl Group {
    #[inline]
    fn hash(&self, key: u32) -> usize {
        // Fibonacci hashing: the top bits of key * 2^32/φ.
        (key.wrapping_mul(0x9E37_79B9) >> self.shift) as usize
    }

    fn build_index(&mut self) {
        let size = (self.nets.len() * 2).next_power_of_two().max(2);
        self.shift = 32 - size.trailing_zeros();
        self.slots = vec![EMPTY; size];
        for (i, &net) in self.nets.iter().enumerate() {
            let mut h = self.hash(net);
            while self.slots[h] != EMPTY {
                h = (h + 1) & (size - 1);
            }
            self.slots[h] = i as u32;
        }
    }

    #[inline]
    fn get(&self, key: u32) -> Option<Hop> {
        let m = self.slots.len() - 1;
        let mut h = self.hash(key);
        loop {
            let i = self.slots[h];
            if i == EMPTY {
                return None;
            }
            if self.nets[i as usize] == key {
                return Some(self.peers[i as usize]);
            }
            h = (h + 1) & m;
        }
    }
}

/// An immutable longest-prefix-match table: subnet → peer's UDP address.
///
/// In a flannel network every lease has the same length, so a lookup is one
/// probe of a small hash table, whatever the number of leases. Mixed lengths
/// (hand-written leases) get one table per length, searched longest first.
#[derive(Debug, Clone, Default)]
pub struct RouteSnapshot {
    groups: Vec<Group>,
    len: usize,
    /// This host's own subnet: where received packets may go.
    local: Option<Ipv4Network>,
}

impl RouteSnapshot {
    pub fn new<H: Into<Hop>>(routes: impl IntoIterator<Item = (Ipv4Network, H)>) -> Self {
        let mut all: Vec<(u8, u32, Hop)> = routes
            .into_iter()
            .map(|(n, p)| (n.prefix(), u32::from(n.network()), p.into()))
            .collect();
        // Longest prefix first, then by address; a duplicate keeps the first.
        all.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        all.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        let len = all.len();
        let mut groups: Vec<Group> = Vec::new();
        for (prefix, net, peer) in all {
            if groups.last().is_none_or(|g| g.prefix != prefix) {
                groups.push(Group {
                    prefix,
                    mask: crate::config::mask(prefix),
                    nets: Vec::new(),
                    peers: Vec::new(),
                    slots: Vec::new(),
                    shift: 0,
                });
            }
            let g = groups.last_mut().expect("pushed above");
            g.nets.push(net);
            g.peers.push(peer);
        }
        for g in &mut groups {
            g.build_index();
        }
        RouteSnapshot {
            groups,
            len,
            local: None,
        }
    }

    /// Sets this host's own subnet (see [`RouteSnapshot::is_local`]).
    pub fn with_local(mut self, local: Ipv4Network) -> Self {
        self.local = Some(local);
        self
    }

    /// This host's own subnet.
    pub fn local(&self) -> Option<Ipv4Network> {
        self.local
    }

    /// Whether `dst` is a unicast address of this host's own subnet. Its
    /// broadcast address is not: a directed broadcast from the tunnel would
    /// reach every workload behind a bridge (a smurf amplifier), so it is
    /// refused like any destination outside the subnet.
    #[inline]
    pub fn is_local(&self, dst: Ipv4Addr) -> bool {
        self.local
            .is_some_and(|l| l.contains(dst) && (l.prefix() >= 31 || dst != l.broadcast()))
    }

    /// The peer owning the longest prefix that contains `dst`.
    #[inline]
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<Hop> {
        let dst = u32::from(dst);
        for g in &self.groups {
            if let Some(peer) = g.get(dst & g.mask) {
                return Some(peer);
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The shared, atomically replaced route table.
#[derive(Debug, Default)]
pub struct RouteTable {
    current: ArcSwap<RouteSnapshot>,
}

impl RouteTable {
    pub fn new(snapshot: RouteSnapshot) -> Self {
        RouteTable {
            current: ArcSwap::from_pointee(snapshot),
        }
    }

    /// The current snapshot; hold it for a batch, not forever.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteSnapshot>> {
        self.current.load()
    }

    pub fn store(&self, snapshot: RouteSnapshot) {
        self.current.store(Arc::new(snapshot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(192, 168, 0, n), 8285)
    }

    #[test]
    fn longest_prefix_wins_and_misses_are_none() {
        let s = RouteSnapshot::new([
            ("10.5.0.0/16".parse().unwrap(), peer(1)),
            ("10.5.3.0/24".parse().unwrap(), peer(3)),
            ("10.5.3.128/25".parse().unwrap(), peer(4)),
            ("10.5.9.0/24".parse().unwrap(), peer(9)),
        ]);
        assert_eq!(s.len(), 4);
        assert_eq!(s.lookup(Ipv4Addr::new(10, 5, 3, 1)), Some(peer(3).into()));
        assert_eq!(s.lookup(Ipv4Addr::new(10, 5, 3, 200)), Some(peer(4).into()));
        assert_eq!(s.lookup(Ipv4Addr::new(10, 5, 9, 255)), Some(peer(9).into()));
        assert_eq!(s.lookup(Ipv4Addr::new(10, 5, 200, 1)), Some(peer(1).into()));
        assert_eq!(s.lookup(Ipv4Addr::new(10, 6, 0, 1)), None);
        assert_eq!(
            RouteSnapshot::default().lookup(Ipv4Addr::new(10, 5, 3, 1)),
            None
        );
    }

    #[test]
    fn local_subnet_excludes_its_broadcast() {
        let s = RouteSnapshot::default().with_local("10.5.3.0/24".parse().unwrap());
        assert!(
            s.is_local(Ipv4Addr::new(10, 5, 3, 0)),
            "the TUN's own address"
        );
        assert!(s.is_local(Ipv4Addr::new(10, 5, 3, 7)));
        assert!(
            !s.is_local(Ipv4Addr::new(10, 5, 3, 255)),
            "directed broadcast"
        );
        assert!(!s.is_local(Ipv4Addr::new(10, 5, 4, 1)));
        assert!(!s.is_local(Ipv4Addr::BROADCAST));
        assert!(!RouteSnapshot::default().is_local(Ipv4Addr::new(10, 5, 3, 7)));
    }

    #[test]
    fn table_swaps_snapshots() {
        let t = RouteTable::default();
        let old = t.load();
        t.store(RouteSnapshot::new([(
            "10.5.3.0/24".parse().unwrap(),
            peer(3),
        )]));
        // A reader holding the old snapshot keeps a consistent view.
        assert!(old.is_empty());
        assert_eq!(
            t.load().lookup(Ipv4Addr::new(10, 5, 3, 7)),
            Some(peer(3).into())
        );
    }

    proptest::proptest! {
        #[test]
        fn matches_a_linear_longest_prefix_scan(
            routes in proptest::collection::vec((proptest::prelude::any::<u32>(), 8u8..=32, 0u8..255), 0..60),
            probes in proptest::collection::vec(proptest::prelude::any::<u32>(), 1..40),
        ) {
            let nets: Vec<(Ipv4Network, SocketAddrV4)> = routes.iter().map(|&(a, l, p)| {
                let n = Ipv4Network::new(Ipv4Addr::from(a), l).unwrap();
                (Ipv4Network::new(n.network(), l).unwrap(), peer(p))
            }).collect();
            let s = RouteSnapshot::new(nets.clone());
            for (i, p) in probes.iter().enumerate() {
                // Probe inside a route half of the time.
                let dst = if i % 2 == 0 && !nets.is_empty() {
                    let n = nets[i % nets.len()].0;
                    Ipv4Addr::from(u32::from(n.network()) | (p & !crate::config::mask(n.prefix())))
                } else {
                    Ipv4Addr::from(*p)
                };
                let expect = nets.iter()
                    .filter(|(n, _)| n.contains(dst))
                    .max_by_key(|(n, _)| n.prefix())
                    .map(|(n, _)| n.prefix());
                let got = s.lookup(dst);
                match expect {
                    None => proptest::prop_assert_eq!(got, None),
                    Some(len) => {
                        // Among equal (prefix, net) duplicates any peer is acceptable.
                        let ok = nets.iter().any(|(n, pe)| n.prefix() == len && n.contains(dst) && Some(Hop::from(*pe)) == got);
                        proptest::prop_assert!(ok);
                    }
                }
            }
        }
    }
}
