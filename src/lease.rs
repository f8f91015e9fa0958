//! Lease logic without I/O: which subnet to take, when to renew, and the
//! peer set that the watch feeds (incl. the diff after a re-list).

use crate::config::NetworkConfig;
use crate::routes::RouteSnapshot;
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

    let taken = Taken::new(leases);
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
    Added(Ipv4Network, Ipv4Addr),
    Changed(Ipv4Network, Ipv4Addr),
    Removed(Ipv4Network),
}

/// The other hosts' leases, as the watch reports them. Our own subnet is
/// never a peer.
#[derive(Debug, Clone, Default)]
pub struct PeerSet {
    own: Option<Ipv4Network>,
    peers: BTreeMap<Ipv4Network, Ipv4Addr>,
}

impl PeerSet {
    pub fn new(own: Option<Ipv4Network>) -> Self {
        PeerSet {
            own,
            peers: BTreeMap::new(),
        }
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

    pub fn get(&self, subnet: &Ipv4Network) -> Option<Ipv4Addr> {
        self.peers.get(subnet).copied()
    }

    /// A lease was put (added or rewritten).
    pub fn upsert(&mut self, subnet: Ipv4Network, public_ip: Ipv4Addr) -> Option<PeerChange> {
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
    pub fn resync(
        &mut self,
        leases: impl IntoIterator<Item = (Ipv4Network, Ipv4Addr)>,
    ) -> Vec<PeerChange> {
        let mut fresh = BTreeMap::new();
        for (sn, ip) in leases {
            if Some(sn) != self.own {
                fresh.insert(sn, ip);
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
        let s = RouteSnapshot::new(
            self.peers
                .iter()
                .map(|(sn, ip)| (*sn, std::net::SocketAddrV4::new(*ip, port))),
        );
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

    fn lease(sn: &str, ip: [u8; 4], id: i64) -> Lease {
        Lease {
            subnet: sn.parse().unwrap(),
            attrs: LeaseAttrs::udp(ip.into()),
            lease_id: id,
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
    fn overlapping_foreign_leases_block_a_subnet() {
        let c = cfg(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.3.0"}"#);
        // A /23 from another writer covers 10.5.2.0 and 10.5.3.0.
        let leases = [lease("10.5.2.0/23", [192, 168, 0, 2], 1)];
        for seed in 0..20 {
            let p = plan_acquire(&c, &leases, ME, None, &mut StdRng::seed_from_u64(seed)).unwrap();
            assert_eq!(p.action, Acquire::Create("10.5.1.0/24".parse().unwrap()));
        }
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
        let ip = |n| Ipv4Addr::new(192, 168, 0, n);
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
            Some(std::net::SocketAddrV4::new(ip(2), 8285))
        );
        assert_eq!(snap.lookup(Ipv4Addr::new(10, 5, 1, 9)), None);
    }
}

/// Decodes a stored lease; the error says what is wrong, for a warning.
pub fn decode(raw: &crate::registry::RawLease) -> Result<Lease, String> {
    let subnet = crate::subnet::parse_key(&raw.key).map_err(|e| e.to_string())?;
    let attrs = LeaseAttrs::from_json(&raw.value).map_err(|e| {
        format!(
            "lease {} has a malformed value {:?}: {e}",
            raw.key,
            String::from_utf8_lossy(&raw.value)
        )
    })?;
    Ok(Lease {
        subnet,
        attrs,
        lease_id: raw.lease_id,
    })
}

#[cfg(test)]
mod decode_tests {
    use super::*;
    use crate::registry::RawLease;

    #[test]
    fn decode_accepts_good_and_explains_bad() {
        let raw = |k: &str, v: &str| RawLease {
            key: k.into(),
            value: v.as_bytes().to_vec(),
            lease_id: 9,
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
    }
}
