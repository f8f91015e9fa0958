//! The lease core, without I/O: which subnet to take, when to renew, which
//! leases of other writers to trust, the peer set the watch feeds, and the
//! [`keeper`] state machine that ties them to a store through the
//! [`store`] seam. Only [`etcd`] talks to etcd; the core never imports it.

pub mod config_wait;
pub mod driver;
pub mod etcd;
pub mod keeper;
#[cfg(test)]
pub mod memory;
pub mod store;

pub use crate::backend::Peer;
use crate::config::NetworkConfig;
use crate::routes::{Hop, RouteSnapshot};
use crate::subnet::LeaseAttrs;
use ipnetwork::Ipv4Network;
use rand::Rng;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

/// flannel's lease TTL: 24 hours.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How many free subnets flannel collects before picking one at random.
const CANDIDATES: usize = 100;

/// A lease as read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Network,
    pub attrs: LeaseAttrs,
    /// The etcd lease id; 0 means a reservation (a key with no TTL).
    pub lease_id: i64,
    /// The store revision of the last write to this key.
    pub mod_revision: i64,
}

impl Lease {
    pub fn is_reservation(&self) -> bool {
        self.lease_id == 0
    }
}

/// What to do to hold a subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// Re-put an existing lease of ours (with a fresh TTL, or none for a reservation).
    Reuse {
        subnet: Ipv4Network,
        reservation: bool,
    },
    /// Create a new lease, only if the key is absent.
    Create(Ipv4Network),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Our own stale leases that no longer fit the config: delete them first.
    pub delete: Vec<Ipv4Network>,
    pub action: Acquire,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("out of subnets: every /{len} between {min} and {max} is leased")]
    OutOfSubnets {
        len: u8,
        min: Ipv4Addr,
        max: Ipv4Addr,
    },
}

/// flannel's choice of subnet (local_manager.go `tryAcquireLease`):
/// our own lease first, then the previous run's subnet if free, then a
/// random free one among the first 100 free subnets from SubnetMin.
pub fn plan_acquire(
    cfg: &NetworkConfig,
    leases: &[Lease],
    public_ip: Ipv4Addr,
    previous: Option<Ipv4Network>,
    rng: &mut impl Rng,
) -> Result<Plan, LeaseError> {
    let mut delete = Vec::new();
    let mut ours = None;
    for l in leases.iter().filter(|l| l.attrs.public_ip == public_ip) {
        if cfg.fits(l.subnet) {
            ours.get_or_insert(l);
        } else if !l.is_reservation() {
            // A reservation is an operator's decision; never delete one.
            delete.push(l.subnet);
        }
    }
    if let Some(l) = ours {
        return Ok(Plan {
            delete,
            action: Acquire::Reuse {
                subnet: l.subnet,
                reservation: l.is_reservation(),
            },
        });
    }

    // Only leases of the Network's shape take space: a rogue 0.0.0.0-0 or
    // a /16 must not make the Network look full.
    let shaped: Vec<Lease> = leases
        .iter()
        .filter(|l| has_lease_shape(cfg, l.subnet))
        .cloned()
        .collect();
    let taken = Taken::new(&shaped);
    if let Some(prev) = previous {
        if cfg.fits(prev) && !taken.overlaps(prev) {
            return Ok(Plan {
                delete,
                action: Acquire::Create(prev),
            });
        }
    }

    let size = cfg.subnet_size() as u64;
    let mut free = Vec::with_capacity(CANDIDATES);
    let mut at = u32::from(cfg.subnet_min) as u64;
    let max = u32::from(cfg.subnet_max) as u64;
    while at <= max && free.len() < CANDIDATES {
        let sn = Ipv4Network::new(Ipv4Addr::from(at as u32), cfg.subnet_len).expect("valid len");
        if !taken.overlaps(sn) {
            free.push(sn);
        }
        at += size;
    }
    if free.is_empty() {
        return Err(LeaseError::OutOfSubnets {
            len: cfg.subnet_len,
            min: cfg.subnet_min,
            max: cfg.subnet_max,
        });
    }
    Ok(Plan {
        delete,
        action: Acquire::Create(free[rng.gen_range(0..free.len())]),
    })
}

/// Leased address ranges, sorted, for overlap checks in O(log n).
struct Taken(Vec<(u32, u32)>);

impl Taken {
    fn new(leases: &[Lease]) -> Self {
        let mut v: Vec<(u32, u32)> = leases
            .iter()
            .map(|l| {
                (
                    u32::from(l.subnet.network()),
                    u32::from(l.subnet.broadcast()),
                )
            })
            .collect();
        v.sort_unstable();
        // Merge so that ranges are disjoint and a binary search suffices.
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match merged.last_mut() {
                Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Taken(merged)
    }

    fn overlaps(&self, sn: Ipv4Network) -> bool {
        let (s, e) = (u32::from(sn.network()), u32::from(sn.broadcast()));
        // First range whose end is >= s.
        let i = self.0.partition_point(|&(_, end)| end < s);
        self.0.get(i).is_some_and(|&(start, _)| start <= e)
    }
}

/// When to renew a lease that expires in `expires_in`: `margin` before the
/// end (flannel), or half-way when the margin is not shorter than the lease
/// (short test TTLs) so renewal never spins.
pub fn renew_delay(expires_in: Duration, margin: Duration) -> Duration {
    if margin < expires_in {
        expires_in - margin
    } else {
        expires_in / 2
    }
}

/// A change to the set of peers, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    Added(Ipv4Network, Peer),
    Changed(Ipv4Network, Peer),
    Removed(Ipv4Network),
}

/// The other hosts' leases, as the watch reports them. Our own subnet is
/// never a peer.
#[derive(Debug, Clone, Default)]
pub struct PeerSet {
    own: Option<Ipv4Network>,
    peers: BTreeMap<Ipv4Network, Peer>,
}

impl PeerSet {
    pub fn new(own: Option<Ipv4Network>) -> Self {
        PeerSet {
            own,
            peers: BTreeMap::new(),
        }
    }

    /// We no longer hold a subnet (another host took it): every lease is
    /// a candidate peer until we hold one again.
    pub fn clear_own(&mut self) {
        self.own = None;
    }

    pub fn set_own(&mut self, own: Ipv4Network) -> Option<PeerChange> {
        self.own = Some(own);
        self.peers.remove(&own).map(|_| PeerChange::Removed(own))
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Every peer: (subnet, PublicIP and backend data).
    pub fn iter(&self) -> impl Iterator<Item = (Ipv4Network, Peer)> + '_ {
        self.peers.iter().map(|(sn, p)| (*sn, *p))
    }

    pub fn get(&self, subnet: &Ipv4Network) -> Option<Peer> {
        self.peers.get(subnet).copied()
    }

    /// A lease was put (added or rewritten).
    pub fn upsert(&mut self, subnet: Ipv4Network, peer: impl Into<Peer>) -> Option<PeerChange> {
        let public_ip = peer.into();
        if Some(subnet) == self.own {
            return None;
        }
        match self.peers.insert(subnet, public_ip) {
            None => Some(PeerChange::Added(subnet, public_ip)),
            Some(old) if old != public_ip => Some(PeerChange::Changed(subnet, public_ip)),
            Some(_) => None,
        }
    }

    /// A lease was deleted or expired.
    pub fn remove(&mut self, subnet: Ipv4Network) -> Option<PeerChange> {
        self.peers
            .remove(&subnet)
            .map(|_| PeerChange::Removed(subnet))
    }

    /// Replaces the set with a fresh list (after a compaction or a broken
    /// watch) and returns what changed, removals included.
    pub fn resync<P: Into<Peer>>(
        &mut self,
        leases: impl IntoIterator<Item = (Ipv4Network, P)>,
    ) -> Vec<PeerChange> {
        let mut fresh = BTreeMap::new();
        for (sn, p) in leases {
            if Some(sn) != self.own {
                fresh.insert(sn, p.into());
            }
        }
        let mut changes = Vec::new();
        for sn in self.peers.keys() {
            if !fresh.contains_key(sn) {
                changes.push(PeerChange::Removed(*sn));
            }
        }
        for (sn, ip) in &fresh {
            match self.peers.get(sn) {
                None => changes.push(PeerChange::Added(*sn, *ip)),
                Some(old) if old != ip => changes.push(PeerChange::Changed(*sn, *ip)),
                Some(_) => {}
            }
        }
        self.peers = fresh;
        changes
    }

    /// Builds the immutable route snapshot the data path reads.
    pub fn snapshot(&self, port: u16) -> RouteSnapshot {
        self.snapshot_except(port, |_, _| false)
    }

    /// The snapshot without the peers `skip` names (those reached by a
    /// kernel route instead, with DirectRouting).
    pub fn snapshot_except(
        &self,
        port: u16,
        skip: impl Fn(&Ipv4Network, &Peer) -> bool,
    ) -> RouteSnapshot {
        let s = RouteSnapshot::new(self.peers.iter().filter(|(sn, p)| !skip(sn, p)).map(
            |(sn, p)| {
                (
                    *sn,
                    Hop {
                        addr: std::net::SocketAddrV4::new(p.ip, p.port.unwrap_or(port)),
                        mac: p.mac.unwrap_or_default(),
                    },
                )
            },
        ));
        match self.own {
            Some(own) => s.with_local(own),
            None => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn cfg(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json).unwrap()
    }

    pub(super) fn lease(sn: &str, ip: [u8; 4], id: i64) -> Lease {
        Lease {
            subnet: sn.parse().unwrap(),
            attrs: LeaseAttrs::udp(ip.into()),
            lease_id: id,
            mod_revision: 1,
        }
    }

    const ME: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);

    #[test]
    fn own_lease_is_reused_and_misfits_deleted() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let leases = [
            lease("10.5.7.0/25", [192, 168, 0, 1], 5), // wrong length: stale
            lease("10.5.9.0/24", [192, 168, 0, 2], 6),
            lease("10.5.8.0/24", [192, 168, 0, 1], 7),
        ];
        let p = plan_acquire(&c, &leases, ME, None, &mut StdRng::seed_from_u64(1)).unwrap();
        assert_eq!(p.delete, vec!["10.5.7.0/25".parse().unwrap()]);
        assert_eq!(
            p.action,
            Acquire::Reuse {
                subnet: "10.5.8.0/24".parse().unwrap(),
                reservation: false
            }
        );
    }

    #[test]
    fn own_reservation_stays_a_reservation_and_others_are_never_taken() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let leases = [lease("10.5.3.0/24", [192, 168, 0, 1], 0)];
        let p = plan_acquire(&c, &leases, ME, None, &mut StdRng::seed_from_u64(1)).unwrap();
        assert_eq!(
            p.action,
            Acquire::Reuse {
                subnet: "10.5.3.0/24".parse().unwrap(),
                reservation: true
            }
        );
        // Someone else's reservation is taken space.
        let leases = [lease("10.5.1.0/24", [192, 168, 0, 9], 0)];
        let c = cfg(r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.2.0"}"#);
        let p = plan_acquire(&c, &leases, ME, None, &mut StdRng::seed_from_u64(1)).unwrap();
        assert_eq!(p.action, Acquire::Create("10.5.2.0/24".parse().unwrap()));
    }

    #[test]
    fn previous_subnet_is_reused_when_free() {
        let c = cfg(r#"{"Network":"10.5.0.0/16"}"#);
        let prev = "10.5.77.0/24".parse().unwrap();
        let p = plan_acquire(&c, &[], ME, Some(prev), &mut StdRng::seed_from_u64(1)).unwrap();
        assert_eq!(p.action, Acquire::Create(prev));
        // Taken by someone else: pick another one.
        let leases = [lease("10.5.77.0/24", [192, 168, 0, 2], 3)];
        let p = plan_acquire(&c, &leases, ME, Some(prev), &mut StdRng::seed_from_u64(1)).unwrap();
        assert_ne!(p.action, Acquire::Create(prev));
        // Not fitting the config (wrong length): not reused.
        let p = plan_acquire(
            &c,
            &[],
            ME,
            Some("10.5.77.0/25".parse().unwrap()),
            &mut StdRng::seed_from_u64(1),
        )
        .unwrap();
        assert!(matches!(p.action, Acquire::Create(sn) if sn.prefix() == 24));
    }

    #[test]
    fn random_choice_is_free_in_range_and_spread() {
        let c =
            cfg(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.250.0"}"#);
        let leases: Vec<Lease> = (10..60)
            .map(|i| lease(&format!("10.5.{i}.0/24"), [192, 168, 1, i as u8], i))
            .collect();
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let p = plan_acquire(&c, &leases, ME, None, &mut rng).unwrap();
            let Acquire::Create(sn) = p.action else {
                panic!()
            };
            assert!(c.fits(sn));
            assert!(!leases.iter().any(|l| l.subnet == sn));
            // Only the first 100 free subnets are candidates.
            assert!(sn.network().octets()[2] < 160);
            seen.insert(sn);
        }
        assert!(seen.len() > 10, "choice should be random, got {seen:?}");
    }

    #[test]
    fn a_foreign_lease_of_another_shape_blocks_nothing() {
        let c = cfg(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.3.0"}"#);
        // A /23 from another writer is not a lease flannel makes: it is
        // never routed (see `validate`) and must not make 10.5.2.0 or
        // 10.5.3.0 look taken. A /24 lease does block its subnet.
        let leases = [
            lease("10.5.2.0/23", [192, 168, 0, 2], 1),
            lease("10.5.1.0/24", [192, 168, 0, 3], 1),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..40 {
            let p = plan_acquire(&c, &leases, ME, None, &mut StdRng::seed_from_u64(seed)).unwrap();
            let Acquire::Create(sn) = p.action else {
                panic!()
            };
            seen.insert(sn.to_string());
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            ["10.5.2.0/24", "10.5.3.0/24"]
        );
    }

    #[test]
    fn out_of_subnets_is_an_error() {
        let c = cfg(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.2.0"}"#);
        let leases = [
            lease("10.5.1.0/24", [192, 168, 0, 2], 1),
            lease("10.5.2.0/24", [192, 168, 0, 3], 2),
        ];
        let e = plan_acquire(&c, &leases, ME, None, &mut StdRng::seed_from_u64(1)).unwrap_err();
        assert!(e.to_string().contains("out of subnets"));
    }

    #[test]
    fn renewal_happens_margin_before_expiry() {
        assert_eq!(
            renew_delay(LEASE_TTL, Duration::from_secs(3600)),
            Duration::from_secs(23 * 3600)
        );
        assert_eq!(
            renew_delay(Duration::from_secs(30), Duration::from_secs(60)),
            Duration::from_secs(15)
        );
    }

    #[test]
    fn peer_set_ignores_own_subnet_and_resync_reports_removals() {
        let own: Ipv4Network = "10.5.1.0/24".parse().unwrap();
        let a: Ipv4Network = "10.5.2.0/24".parse().unwrap();
        let b: Ipv4Network = "10.5.3.0/24".parse().unwrap();
        let c: Ipv4Network = "10.5.4.0/24".parse().unwrap();
        let ip = |n| Peer::from(Ipv4Addr::new(192, 168, 0, n));
        let mut p = PeerSet::new(Some(own));
        assert_eq!(p.upsert(own, ip(1)), None);
        assert_eq!(p.upsert(a, ip(2)), Some(PeerChange::Added(a, ip(2))));
        assert_eq!(p.upsert(a, ip(2)), None);
        assert_eq!(p.upsert(a, ip(5)), Some(PeerChange::Changed(a, ip(5))));
        assert_eq!(p.upsert(b, ip(3)), Some(PeerChange::Added(b, ip(3))));
        let changes = p.resync([(own, ip(1)), (a, ip(2)), (c, ip(4))]);
        assert_eq!(
            changes,
            vec![
                PeerChange::Removed(b),
                PeerChange::Changed(a, ip(2)),
                PeerChange::Added(c, ip(4)),
            ]
        );
        assert_eq!(p.len(), 2);
        assert_eq!(p.remove(c), Some(PeerChange::Removed(c)));
        assert_eq!(p.remove(c), None);
        let snap = p.snapshot(8285);
        assert_eq!(
            snap.lookup(Ipv4Addr::new(10, 5, 2, 9)),
            Some(std::net::SocketAddrV4::new(ip(2).ip, 8285).into())
        );
        assert_eq!(snap.lookup(Ipv4Addr::new(10, 5, 1, 9)), None);
    }
}

/// At most this much of a bad value goes into a log line.
const SHOWN: usize = 64;

/// The start of a value, for a log line: never a whole (maybe huge) value.
pub fn excerpt(value: &[u8]) -> String {
    if value.len() <= SHOWN {
        format!("{:?}", String::from_utf8_lossy(value))
    } else {
        format!(
            "{:?}… ({} bytes)",
            String::from_utf8_lossy(&value[..SHOWN]),
            value.len()
        )
    }
}

/// Decodes a stored lease; the error says what is wrong, for a warning.
pub fn decode(raw: &store::RawLease) -> Result<Lease, String> {
    let shown = || {
        let k = raw.key.as_bytes();
        String::from_utf8_lossy(&k[..k.len().min(2 * SHOWN)]).into_owned()
    };
    let subnet = crate::subnet::parse_key(&raw.key)
        .map_err(|e| format!("key {:?} is not a lease: {e}", shown()))?;
    let attrs = LeaseAttrs::from_json(&raw.value).map_err(|e| {
        format!(
            "lease {} has a malformed value {}: {e}",
            shown(),
            excerpt(&raw.value)
        )
    })?;
    Ok(Lease {
        subnet,
        attrs,
        lease_id: raw.lease_id,
        mod_revision: raw.mod_revision,
    })
}

/// Whether `subnet` has the shape of a lease flannel's writers make: the
/// Network's SubnetLen, inside the Network. Anything else (the whole
/// Network, `0.0.0.0-0`, a /25 inside another host's /24) is never routed
/// and never counts as taken space.
pub fn has_lease_shape(cfg: &NetworkConfig, subnet: Ipv4Network) -> bool {
    subnet.prefix() == cfg.subnet_len && cfg.network.contains(subnet.network())
}

/// Why a lease of another writer is ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("{subnet} is not a /{len} inside the Network {network}")]
    Shape {
        subnet: Ipv4Network,
        len: u8,
        network: Ipv4Network,
    },
    #[error("its PublicIP {0} cannot be a host's address")]
    PublicIp(Ipv4Addr),
    #[error("{0}")]
    Backend(crate::backend::BackendReject),
}

/// The rules a lease must pass before it becomes a route: the Network's
/// shape, and a PublicIP that can be a host (not unspecified, loopback,
/// multicast, broadcast, nor inside the overlay itself, which would send
/// the tunnel's datagrams into the tunnel).
pub fn validate(cfg: &NetworkConfig, l: &Lease) -> Result<Peer, Reject> {
    validate_addr(cfg, l.subnet, l.attrs.public_ip)?;
    crate::backend::peer(&cfg.backend, &l.attrs).map_err(Reject::Backend)
}

/// The shape and PublicIP rules alone (for a peer read back from the
/// peer cache, whose backend data was checked when it was a lease).
pub fn validate_addr(cfg: &NetworkConfig, subnet: Ipv4Network, ip: Ipv4Addr) -> Result<(), Reject> {
    if !has_lease_shape(cfg, subnet) {
        return Err(Reject::Shape {
            subnet,
            len: cfg.subnet_len,
            network: cfg.network,
        });
    }
    if ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_broadcast()
        || cfg.network.contains(ip)
    {
        return Err(Reject::PublicIp(ip));
    }
    Ok(())
}

#[cfg(test)]
mod decode_tests {
    use super::store::RawLease;
    use super::*;

    #[test]
    fn decode_accepts_good_and_explains_bad() {
        let raw = |k: &str, v: &str| RawLease {
            key: k.into(),
            value: v.as_bytes().to_vec(),
            lease_id: 9,
            mod_revision: 3,
        };
        let l = decode(&raw(
            "/p/subnets/10.5.3.0-24",
            r#"{"PublicIP":"1.2.3.4","PublicIPv6":null}"#,
        ))
        .unwrap();
        assert_eq!(l.subnet, "10.5.3.0/24".parse().unwrap());
        assert_eq!(l.lease_id, 9);
        let e = decode(&raw("/p/subnets/10.5.3.0-24", "{oops")).unwrap_err();
        assert!(e.contains("10.5.3.0-24") && e.contains("malformed"), "{e}");
        assert!(decode(&raw("/p/subnets/garbage", "{}")).is_err());
        // A huge bad value is shown by its start and its size only.
        let big = format!("{{{}", "x".repeat(1 << 20));
        let e = decode(&raw("/p/subnets/10.5.3.0-24", &big)).unwrap_err();
        assert!(e.len() < 400 && e.contains("1048577 bytes"), "{}", e.len());
    }

    #[test]
    fn only_network_shaped_leases_with_a_host_public_ip_are_valid() {
        let cfg = NetworkConfig::parse(r#"{"Network":"10.44.0.0/16"}"#).unwrap();
        let l = |sn: &str, ip: [u8; 4]| super::tests::lease(sn, ip, 1);
        assert_eq!(
            validate(&cfg, &l("10.44.85.0/24", [192, 168, 0, 2])),
            Ok(Peer::from([192, 168, 0, 2]))
        );
        for bad in ["10.44.0.0/16", "0.0.0.0/0", "10.44.85.0/25", "10.45.1.0/24"] {
            assert!(
                matches!(
                    validate(&cfg, &l(bad, [192, 168, 0, 2])),
                    Err(Reject::Shape { .. })
                ),
                "{bad}"
            );
        }
        for ip in [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [224, 0, 0, 5],
            [255; 4],
            [10, 44, 1, 1],
        ] {
            assert_eq!(
                validate(&cfg, &l("10.44.85.0/24", ip)),
                Err(Reject::PublicIp(ip.into())),
                "{ip:?}"
            );
        }
    }

    #[test]
    fn rogue_leases_never_make_the_network_look_full() {
        use rand::SeedableRng;
        let cfg = NetworkConfig::parse(r#"{"Network":"10.44.0.0/16"}"#).unwrap();
        let l = |sn: &str| super::tests::lease(sn, [192, 168, 9, 9], 1);
        let leases = [l("0.0.0.0/0"), l("10.44.0.0/16"), l("10.44.85.0/25")];
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let plan = plan_acquire(&cfg, &leases, [192, 168, 0, 1].into(), None, &mut rng).unwrap();
        assert!(matches!(plan.action, Acquire::Create(sn) if sn.prefix() == 24));
    }
}
