//! The wireguard backend's protocol side: keys and the key file, the peer
//! table the data path seals and opens datagrams with, and the timers.
//!
//! WireGuard itself (the Noise_IKpsk2 handshake, sessions, replay window,
//! cookies under load, rekey and keepalive timers, ChaCha20-Poly1305) is
//! `boringtun`'s `noise::Tunn`, one per peer. This module decides which
//! peer a datagram belongs to (by receiver index, or for a handshake
//! initiation by the static key inside it), enforces cryptokey routing (a
//! decrypted packet must come from inside the sending peer's subnet, its
//! AllowedIPs), and bounds the packets waiting on a handshake. No sockets
//! here: the data path sends what these functions return.

use crate::forward::DropReason;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnetwork::Ipv4Network;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes WireGuard adds on the underlay to an IPv4 packet: outer IPv4 (20),
/// UDP (8), message header (16) and AEAD tag (16), with flannel's margin
/// for IPv6 underlays: flannel subtracts 80 from the interface MTU.
pub const OVERHEAD: usize = 80;
/// What a data message adds to its plaintext (header + tag).
pub const DATA_OVERHEAD: usize = 32;
/// Packets that may wait for one peer's handshake; more are dropped and
/// counted (`no_session`). boringtun's own queue holds as many.
pub const MAX_WAITING: usize = 256;
/// Handshake initiations per second, per the whole daemon, before cookie
/// replies are asked for (WireGuard's "under load"). Each initiation is
/// counted here once, before the Diffie-Hellman that finds out its peer;
/// each peer's own state then has boringtun's per-peer budget (10 per
/// timer tick), so one chatty peer meets cookies before the daemon does.
const HANDSHAKES_PER_SECOND: u64 = 100;
/// The key file flannel uses.
pub const DEFAULT_KEY_FILE: &str = "/run/flannel/wgkey";
/// How often the timers run (rekey, keepalive, retries).
pub const TICK: Duration = Duration::from_millis(250);

/// Why a key does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("is not base64")]
    Base64,
    #[error("is {0} bytes, not 32")]
    Length(usize),
}

/// A WireGuard key from its base64 text (as `wg genkey`/`wg pubkey` print).
pub fn key_from_base64(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = B64.decode(text.trim()).map_err(|_| KeyError::Base64)?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::Length(bytes.len()))
}

pub fn key_to_base64(key: &[u8; 32]) -> String {
    B64.encode(key)
}

/// Our static private key. Never printed: its `Debug` shows the public key.
pub struct PrivateKey(StaticSecret);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey(public {})", key_to_base64(&self.public()))
    }
}

impl PrivateKey {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        PrivateKey(StaticSecret::from(b))
    }

    pub fn generate() -> Self {
        let mut b = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
        Self::from_bytes(b)
    }

    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.0).to_bytes()
    }

    fn secret(&self) -> StaticSecret {
        self.0.clone()
    }
}

/// Reads our private key from `path`, or makes one and writes it there
/// (mode 0400, created exclusively) when there is none: a restart keeps
/// the key, so peers need not follow a new one. A file that others can
/// read, or that is not 32 bytes of base64, is refused: a key the host's
/// other users can read is no secret.
pub fn load_or_create_key(path: &Path) -> io::Result<PrivateKey> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let named = |what: String| {
        io::Error::other(format!("the wireguard key file {}: {what}", path.display()))
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) => {
            if !m.file_type().is_file() {
                return Err(named("is not a regular file".into()));
            }
            if m.mode() & 0o007 != 0 {
                return Err(named(format!(
                    "is readable by every user (mode {:o}); `chmod 0400` it, or delete it to have a new key made",
                    m.mode() & 0o777
                )));
            }
            let text = std::fs::read_to_string(path).map_err(|e| named(e.to_string()))?;
            let b = key_from_base64(&text).map_err(|e| {
                named(format!(
                    "{e}: it must hold one private key as `wg genkey` prints it"
                ))
            })?;
            Ok(PrivateKey::from_bytes(b))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| named(format!("making its directory: {e}")))?;
            }
            let key = PrivateKey::generate();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| named(format!("creating it: {e}")))?;
            io::Write::write_all(&mut f, key_to_base64(&key.0.to_bytes()).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| named(format!("writing it: {e}")))?;
            tracing::info!(key_file = %path.display(), public_key = %key_to_base64(&key.public()), "made a new wireguard key");
            Ok(key)
        }
        Err(e) => Err(named(e.to_string())),
    }
}

/// One peer: its tunnel state and what its lease says.
pub struct WgPeer {
    pub key: [u8; 32],
    /// Where its datagrams go (PublicIP:Port from its lease).
    pub endpoint: SocketAddrV4,
    /// Its AllowedIPs: its lease's subnet.
    pub subnet: Ipv4Network,
    /// Our receiver index for it (its upper 24 bits).
    index: u32,
    tunn: Mutex<Tunn>,
    /// Packets handed to `seal` while there was no session, not yet sent.
    waiting: AtomicUsize,
    /// A new peer: the next tick starts a handshake with it, so that a peer
    /// still holding a session with an earlier run of ours (we restarted)
    /// gets a new one at once rather than after its 15 s of silence.
    greet: AtomicBool,
}

impl std::fmt::Debug for WgPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WgPeer({} {} {})",
            key_to_base64(&self.key),
            self.endpoint,
            self.subnet
        )
    }
}

impl WgPeer {
    pub fn lock(&self) -> MutexGuard<'_, Tunn> {
        self.tunn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether packets are waiting for this peer's handshake.
    pub fn has_waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }
}

/// What sealing one packet gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealed {
    /// A data message of this many bytes, to the peer's endpoint.
    Data(usize),
    /// No session yet: the packet waits, and this many bytes of handshake
    /// initiation are to be sent to the peer's endpoint now.
    Handshake(usize),
    /// No session yet: the packet waits (a handshake is under way).
    Waiting,
    /// No session, and the waiting queue is full: dropped.
    Full,
}

/// Seals `plain` for `peer` into `out` (at least `plain.len() + 32`, and
/// 148, bytes). `t` is the peer's locked tunnel.
pub fn seal(peer: &WgPeer, t: &mut Tunn, plain: &[u8], out: &mut [u8]) -> Sealed {
    let waiting = peer.waiting.load(Ordering::Relaxed);
    if waiting >= MAX_WAITING {
        // Only a session ends the wait; try the packet, which either goes
        // out (the session just came) or is dropped here, not by boringtun.
        if t.time_since_last_handshake().is_none() {
            return Sealed::Full;
        }
    }
    match t.encapsulate(plain, out) {
        TunnResult::WriteToNetwork(d) if is_data(d) => Sealed::Data(d.len()),
        TunnResult::WriteToNetwork(d) => {
            peer.waiting.fetch_add(1, Ordering::Relaxed);
            Sealed::Handshake(d.len())
        }
        _ => {
            peer.waiting.fetch_add(1, Ordering::Relaxed);
            Sealed::Waiting
        }
    }
}

fn is_data(d: &[u8]) -> bool {
    d.first() == Some(&4)
}

/// What opening one received datagram gave.
#[derive(Debug, Clone)]
pub enum Opened {
    /// An IPv4 packet of this many bytes at the start of `out`, from inside
    /// the peer's AllowedIPs.
    Packet(usize, Arc<WgPeer>),
    /// A reply (handshake response, cookie, keepalive) of this many bytes
    /// in `out`, to send back to where the datagram came from.
    Reply(usize, Arc<WgPeer>),
    /// A valid message that needs nothing sent (a keepalive, a cookie).
    Nothing(Arc<WgPeer>),
    Drop(DropReason),
}

/// The peers, looked up three ways; replaced whole when the leases change.
#[derive(Default)]
struct Table {
    by_endpoint: HashMap<SocketAddrV4, Arc<WgPeer>>,
    by_key: HashMap<[u8; 32], Arc<WgPeer>>,
    /// By the upper 24 bits of our receiver indices.
    by_index: HashMap<u32, Arc<WgPeer>>,
}

/// The wireguard backend's state, shared by every worker.
pub struct Wg {
    private: PrivateKey,
    public: PublicKey,
    psk: Option<[u8; 32]>,
    keepalive: Option<u16>,
    limiter: Arc<RateLimiter>,
    table: arc_swap::ArcSwap<Table>,
    next_index: AtomicU32,
    last_limiter_reset: Mutex<Instant>,
}

impl Wg {
    pub fn new(private: PrivateKey, psk: Option<[u8; 32]>, keepalive: u16) -> Self {
        let public = PublicKey::from(&private.0);
        Wg {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND)),
            private,
            public,
            psk,
            keepalive: (keepalive > 0).then_some(keepalive),
            table: Default::default(),
            // Random, so indices of an earlier run of ours that a peer still
            // uses are unlikely to name a peer of this run.
            next_index: AtomicU32::new(rand::random::<u32>() & 0xff_ffff),
            last_limiter_reset: Mutex::new(Instant::now()),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// Makes the table the given peers (subnet, endpoint, public key). A
    /// peer whose key, endpoint and subnet are unchanged keeps its
    /// sessions; a changed one starts over with a new handshake.
    pub fn sync(&self, peers: impl IntoIterator<Item = (Ipv4Network, SocketAddrV4, [u8; 32])>) {
        let old = self.table.load();
        let mut t = Table::default();
        for (subnet, endpoint, key) in peers {
            let kept = old
                .by_key
                .get(&key)
                .filter(|p| p.endpoint == endpoint && p.subnet == subnet)
                .cloned();
            let p = match kept {
                Some(p) => p,
                None => match self.new_peer(subnet, endpoint, key) {
                    Some(p) => p,
                    None => continue,
                },
            };
            if t.by_key.contains_key(&key) {
                tracing::warn!(peer = %endpoint, "two leases carry the same wireguard public key; only the first is used");
                continue;
            }
            t.by_endpoint.insert(endpoint, p.clone());
            t.by_key.insert(key, p.clone());
            t.by_index.insert(p.index, p);
        }
        self.table.store(Arc::new(t));
    }

    fn new_peer(
        &self,
        subnet: Ipv4Network,
        endpoint: SocketAddrV4,
        key: [u8; 32],
    ) -> Option<Arc<WgPeer>> {
        if key == self.public.to_bytes() {
            return None;
        }
        let index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
        let tunn = Tunn::new(
            self.private.secret(),
            PublicKey::from(key),
            self.psk,
            self.keepalive,
            index,
            // Not the shared limiter: decapsulate() counts the initiation
            // again, and the daemon-wide budget would be spent twice per
            // handshake. Its own limiter is reset by its own timers.
            None,
        )
        .ok()?;
        Some(Arc::new(WgPeer {
            key,
            endpoint,
            subnet,
            index,
            tunn: Mutex::new(tunn),
            waiting: AtomicUsize::new(0),
            greet: AtomicBool::new(true),
        }))
    }

    /// The peer datagrams to `endpoint` are sealed for.
    #[inline]
    pub fn peer(&self, endpoint: SocketAddrV4) -> Option<Arc<WgPeer>> {
        self.table.load().by_endpoint.get(&endpoint).cloned()
    }

    pub fn peers(&self) -> Vec<Arc<WgPeer>> {
        self.table.load().by_key.values().cloned().collect()
    }

    /// Opens a datagram received from `from` into `out` (at least as long
    /// as the datagram, and 148 bytes).
    pub fn open(&self, from: SocketAddrV4, d: &[u8], out: &mut [u8]) -> Opened {
        let table = self.table.load();
        let peer = match Tunn::parse_incoming_packet(d) {
            Err(_) => return Opened::Drop(DropReason::Unauthenticated),
            Ok(Packet::HandshakeInit(init)) => {
                // Check mac1 (and, under load, ask for a cookie) before the
                // Diffie-Hellman that finds out who is asking.
                match self
                    .limiter
                    .verify_packet(Some(IpAddr::V4(*from.ip())), d, out)
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(c)) => {
                        let n = c.len();
                        // A cookie reply names no peer of ours yet: answer
                        // from the peer slot of whoever the key is, if known.
                        return match parse_handshake_anon(&self.private.0, &self.public, &init)
                            .ok()
                            .and_then(|h| table.by_key.get(&h.peer_static_public).cloned())
                        {
                            Some(p) => Opened::Reply(n, p),
                            None => Opened::Drop(DropReason::Unauthenticated),
                        };
                    }
                    Err(_) => return Opened::Drop(DropReason::Unauthenticated),
                }
                match parse_handshake_anon(&self.private.0, &self.public, &init) {
                    Ok(h) => table.by_key.get(&h.peer_static_public).cloned(),
                    Err(_) => None,
                }
            }
            Ok(Packet::HandshakeResponse(p)) => table.by_index.get(&(p.receiver_idx >> 8)).cloned(),
            Ok(Packet::PacketCookieReply(p)) => table.by_index.get(&(p.receiver_idx >> 8)).cloned(),
            Ok(Packet::PacketData(p)) => table.by_index.get(&(p.receiver_idx >> 8)).cloned(),
        };
        let Some(peer) = peer else {
            return Opened::Drop(DropReason::Unauthenticated);
        };
        let r = peer
            .lock()
            .decapsulate(Some(IpAddr::V4(*from.ip())), d, out);
        match r {
            TunnResult::WriteToTunnelV4(pkt, src) => {
                if !peer.subnet.contains(src) {
                    // Cryptokey routing: a peer speaks only for its subnet.
                    return Opened::Drop(DropReason::Spoofed);
                }
                let n = pkt.len();
                Opened::Packet(n, peer)
            }
            TunnResult::WriteToTunnelV6(..) => Opened::Drop(DropReason::NotIpv4),
            TunnResult::WriteToNetwork(reply) => {
                let n = reply.len();
                Opened::Reply(n, peer)
            }
            TunnResult::Done => Opened::Nothing(peer),
            TunnResult::Err(_) => Opened::Drop(DropReason::Unauthenticated),
        }
    }

    /// The next waiting packet of `peer`, sealed into `out`, once its
    /// session is up: `Some(len)` to send to its endpoint; `None` when none
    /// waits (or the session is not up yet).
    pub fn next_waiting(peer: &WgPeer, out: &mut [u8]) -> Option<usize> {
        if !peer.has_waiting() {
            return None;
        }
        let mut t = peer.lock();
        match t.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(d) if is_data(d) => {
                let _ = peer
                    .waiting
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| w.checked_sub(1));
                Some(d.len())
            }
            TunnResult::WriteToNetwork(d) => Some(d.len()),
            _ => {
                // Nothing came out: either the queue is empty or no session
                // is current yet. Only an empty queue with a session resets.
                if t.time_since_last_handshake().is_some() {
                    peer.waiting.store(0, Ordering::Relaxed);
                }
                None
            }
        }
    }

    /// Runs every peer's timers (handshake retries, rekeys, keepalives,
    /// expiry); `send` gets each datagram they produce with its endpoint.
    pub fn tick(&self, out: &mut [u8], mut send: impl FnMut(&[u8], SocketAddrV4)) {
        {
            let mut last = self
                .last_limiter_reset
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if last.elapsed() >= Duration::from_secs(1) {
                self.limiter.reset_count();
                *last = Instant::now();
            }
        }
        for p in self.peers() {
            let mut t = p.lock();
            if p.greet.swap(false, Ordering::Relaxed) && t.time_since_last_handshake().is_none() {
                if let TunnResult::WriteToNetwork(d) = t.format_handshake_initiation(out, false) {
                    send(d, p.endpoint);
                    continue;
                }
            }
            if let TunnResult::WriteToNetwork(d) = t.update_timers(out) {
                send(d, p.endpoint);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const A_EP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 51820);
    const B_EP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 51820);

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    /// A minimal IPv4 packet (WireGuard reads only version and length).
    fn packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(payload);
        let len = (p.len() as u16).to_be_bytes();
        p[2..4].copy_from_slice(&len);
        p
    }

    fn pair(psk_a: Option<[u8; 32]>, psk_b: Option<[u8; 32]>) -> (Wg, Wg) {
        let a = Wg::new(PrivateKey::generate(), psk_a, 0);
        let b = Wg::new(PrivateKey::generate(), psk_b, 0);
        a.sync([(net("10.5.2.0/24"), B_EP, b.public_key())]);
        b.sync([(net("10.5.1.0/24"), A_EP, a.public_key())]);
        (a, b)
    }

    /// Seals `pkt` from A to B and returns what goes on the wire.
    fn seal_one(a: &Wg, pkt: &[u8]) -> (Sealed, Vec<u8>) {
        let p = a.peer(B_EP).expect("B is A's peer");
        let mut out = vec![0u8; 2048];
        let r = seal(&p, &mut p.lock(), pkt, &mut out);
        let n = match r {
            Sealed::Data(n) | Sealed::Handshake(n) => n,
            _ => 0,
        };
        out.truncate(n);
        (r, out)
    }

    /// Runs the handshake A starts with `first` waiting; returns the
    /// first packet once delivered to B.
    fn handshake(a: &Wg, b: &Wg, first: &[u8]) -> Vec<u8> {
        let (r, init) = seal_one(a, first);
        assert!(matches!(r, Sealed::Handshake(148)), "{r:?}");
        let mut buf = vec![0u8; 2048];
        let Opened::Reply(n, _) = b.open(A_EP, &init, &mut buf) else {
            panic!("B answers the initiation")
        };
        let resp = buf[..n].to_vec();
        let Opened::Reply(n, pb) = a.open(B_EP, &resp, &mut buf) else {
            panic!("A confirms with a keepalive")
        };
        let keepalive = buf[..n].to_vec();
        assert!(matches!(
            b.open(A_EP, &keepalive, &mut buf),
            Opened::Nothing(_)
        ));
        let n = Wg::next_waiting(&pb, &mut buf)
            .expect("the waiting packet goes once the session is up");
        let data = buf[..n].to_vec();
        assert_eq!(Wg::next_waiting(&pb, &mut buf), None);
        let Opened::Packet(n, from) = b.open(A_EP, &data, &mut buf) else {
            panic!("B opens the waiting packet")
        };
        assert_eq!(from.key, a.public_key());
        buf[..n].to_vec()
    }

    #[test]
    fn a_handshake_carries_the_waiting_packet_then_data_flows_both_ways() {
        let (a, b) = pair(None, None);
        let first = packet([10, 5, 1, 2], [10, 5, 2, 2], b"first");
        assert_eq!(handshake(&a, &b, &first), first);

        let pkt = packet([10, 5, 1, 2], [10, 5, 2, 2], &[7u8; 1400]);
        let (r, d) = seal_one(&a, &pkt);
        assert_eq!(r, Sealed::Data(pkt.len() + DATA_OVERHEAD));
        let mut buf = vec![0u8; 2048];
        let Opened::Packet(n, _) = b.open(A_EP, &d, &mut buf) else {
            panic!()
        };
        assert_eq!(&buf[..n], &pkt[..]);
        // The same datagram again is a replay.
        assert!(matches!(
            b.open(A_EP, &d, &mut buf),
            Opened::Drop(DropReason::Unauthenticated)
        ));
        // A flipped byte fails the AEAD.
        let mut bad = d.clone();
        bad[40] ^= 1;
        assert!(matches!(
            b.open(A_EP, &bad, &mut buf),
            Opened::Drop(DropReason::Unauthenticated)
        ));

        // B to A, on the session A started.
        let back = packet([10, 5, 2, 2], [10, 5, 1, 2], b"back");
        let pa = b.peer(A_EP).unwrap();
        let mut out = vec![0u8; 2048];
        let Sealed::Data(n) = seal(&pa, &mut pa.lock(), &back, &mut out) else {
            panic!()
        };
        let Opened::Packet(m, _) = a.open(B_EP, &out[..n], &mut buf) else {
            panic!()
        };
        assert_eq!(&buf[..m], &back[..]);
    }

    #[test]
    fn a_peer_speaks_only_for_its_subnet_and_garbage_opens_nothing() {
        let (a, b) = pair(None, None);
        handshake(&a, &b, &packet([10, 5, 1, 2], [10, 5, 2, 2], b"x"));
        let mut buf = vec![0u8; 2048];
        // A valid peer's packet with a source outside its subnet (AllowedIPs).
        let forged = packet([10, 5, 3, 9], [10, 5, 2, 2], b"forged");
        let (_, d) = seal_one(&a, &forged);
        assert!(matches!(
            b.open(A_EP, &d, &mut buf),
            Opened::Drop(DropReason::Spoofed)
        ));
        for junk in [
            &b""[..],
            &[4, 0, 0, 0][..],
            &[1u8; 148][..],
            &[4u8; 100][..],
            &[9u8; 64][..],
        ] {
            assert!(
                matches!(
                    b.open(A_EP, junk, &mut buf),
                    Opened::Drop(DropReason::Unauthenticated)
                ),
                "{junk:?}"
            );
        }
        // A stranger's handshake: a key B has no peer for.
        let c = Wg::new(PrivateKey::generate(), None, 0);
        c.sync([(net("10.5.2.0/24"), B_EP, b.public_key())]);
        let (r, init) = seal_one(&c, b"\x45");
        assert!(matches!(r, Sealed::Handshake(_)));
        assert!(matches!(
            b.open(A_EP, &init, &mut buf),
            Opened::Drop(DropReason::Unauthenticated)
        ));
    }

    #[test]
    fn a_wrong_psk_completes_no_handshake() {
        let (a, b) = pair(Some([1; 32]), Some([2; 32]));
        let (_, init) = seal_one(&a, &packet([10, 5, 1, 2], [10, 5, 2, 2], b"x"));
        let mut buf = vec![0u8; 2048];
        let resp = match b.open(A_EP, &init, &mut buf) {
            Opened::Reply(n, _) => buf[..n].to_vec(),
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            a.open(B_EP, &resp, &mut buf),
            Opened::Drop(DropReason::Unauthenticated)
        ));
        // The same PSK on both ends works.
        let (a, b) = pair(Some([3; 32]), Some([3; 32]));
        let p = packet([10, 5, 1, 2], [10, 5, 2, 2], b"ok");
        assert_eq!(handshake(&a, &b, &p), p);
    }

    #[test]
    fn each_handshake_counts_once_against_the_daemon_wide_budget() {
        // 70 peers start a handshake with B in the same second: under the
        // budget of 100, every one is answered, none is asked for a cookie
        // (counted twice, the 51st would be).
        let b = Wg::new(PrivateKey::generate(), None, 0);
        let peers: Vec<(Wg, SocketAddrV4)> = (0..70u8)
            .map(|i| {
                let a = Wg::new(PrivateKey::generate(), None, 0);
                let ep = SocketAddrV4::new(Ipv4Addr::new(192, 0, 3, i), 51820);
                a.sync([(net("10.5.2.0/24"), B_EP, b.public_key())]);
                (a, ep)
            })
            .collect();
        b.sync(peers.iter().enumerate().map(|(i, (a, ep))| {
            let subnet = Ipv4Network::new(Ipv4Addr::new(10, 5, 100 + i as u8, 0), 24).unwrap();
            (subnet, *ep, a.public_key())
        }));
        let mut buf = vec![0u8; 2048];
        let init = |a: &Wg| {
            let p = a.peer(B_EP).unwrap();
            let mut out = vec![0u8; 256];
            let TunnResult::WriteToNetwork(d) =
                p.lock().format_handshake_initiation(&mut out, true)
            else {
                panic!("an initiation")
            };
            d.to_vec()
        };
        let mut kinds = |b: &Wg, from: SocketAddrV4, d: &[u8]| match b.open(from, d, &mut buf) {
            Opened::Reply(n, _) => buf[0] as usize * 1000 + n,
            _ => 0,
        };
        const RESPONSE: usize = 2 * 1000 + 92;
        const COOKIE: usize = 3 * 1000 + 64;
        for (a, ep) in &peers {
            let d = init(a);
            assert_eq!(kinds(&b, *ep, &d), RESPONSE);
        }
        // The budget still holds: 40 more initiations in the same second
        // take it past 100, and the last ones are asked for a cookie.
        let answers: Vec<usize> = peers[..40]
            .iter()
            .map(|(a, ep)| {
                let d = init(a);
                kinds(&b, *ep, &d)
            })
            .collect();
        assert_eq!(
            answers[..30].iter().filter(|&&k| k == RESPONSE).count(),
            30,
            "{answers:?}"
        );
        assert!(answers[30..].iter().all(|&k| k == COOKIE), "{answers:?}");
    }

    #[test]
    fn packets_waiting_on_a_handshake_are_bounded() {
        let (a, _b) = pair(None, None);
        let pkt = packet([10, 5, 1, 2], [10, 5, 2, 2], b"w");
        let mut counts = std::collections::HashMap::new();
        for _ in 0..MAX_WAITING + 10 {
            *counts
                .entry(
                    format!("{:?}", seal_one(&a, &pkt).0)
                        .split('(')
                        .next()
                        .unwrap()
                        .to_string(),
                )
                .or_insert(0) += 1;
        }
        assert_eq!(counts.get("Handshake"), Some(&1), "{counts:?}");
        assert_eq!(counts.get("Full"), Some(&10), "{counts:?}");
    }

    #[test]
    fn a_resync_keeps_unchanged_peers_and_renews_changed_ones() {
        let (a, b) = pair(None, None);
        handshake(&a, &b, &packet([10, 5, 1, 2], [10, 5, 2, 2], b"x"));
        let before = a.peer(B_EP).unwrap();
        a.sync([(net("10.5.2.0/24"), B_EP, b.public_key())]);
        assert!(
            Arc::ptr_eq(&before, &a.peer(B_EP).unwrap()),
            "same lease: same session"
        );
        // B comes back with a new key: A follows it.
        let b2 = Wg::new(PrivateKey::generate(), None, 0);
        a.sync([(net("10.5.2.0/24"), B_EP, b2.public_key())]);
        assert_eq!(a.peer(B_EP).unwrap().key, b2.public_key());
        // Our own key never becomes a peer; a deleted lease removes the peer.
        a.sync([(net("10.5.9.0/24"), B_EP, a.public_key())]);
        assert!(a.peer(B_EP).is_none());
    }

    #[test]
    fn a_restarted_peer_greets_and_the_survivor_moves_to_its_new_session_at_once() {
        let raw_b: [u8; 32] = rand::random();
        let a = Wg::new(PrivateKey::generate(), None, 0);
        let b = Wg::new(PrivateKey::from_bytes(raw_b), None, 0);
        a.sync([(net("10.5.2.0/24"), B_EP, b.public_key())]);
        b.sync([(net("10.5.1.0/24"), A_EP, a.public_key())]);
        handshake(&a, &b, &packet([10, 5, 1, 2], [10, 5, 2, 2], b"x"));
        let mut buf = vec![0u8; 2048];
        let mut sent = Vec::new();
        // Peers with a session are not greeted again.
        a.tick(&mut buf, |d, to| sent.push((d.to_vec(), to)));
        assert!(sent.is_empty(), "{sent:?}");
        // B restarts with the same key and no sessions: A's data is opaque
        // to it...
        drop(b);
        let b = Wg::new(PrivateKey::from_bytes(raw_b), None, 0);
        b.sync([(net("10.5.1.0/24"), A_EP, a.public_key())]);
        let pkt = packet([10, 5, 1, 2], [10, 5, 2, 2], b"after");
        let (r, old) = seal_one(&a, &pkt);
        assert!(matches!(r, Sealed::Data(_)), "{r:?}");
        assert!(matches!(
            b.open(A_EP, &old, &mut buf),
            Opened::Drop(DropReason::Unauthenticated)
        ));
        // ...until its first tick greets A, once.
        b.tick(&mut buf, |d, to| sent.push((d.to_vec(), to)));
        b.tick(&mut buf, |d, to| sent.push((d.to_vec(), to)));
        assert_eq!(sent.len(), 1, "one greeting");
        let (init, to) = sent.pop().unwrap();
        assert_eq!((init[0], init.len(), to), (1, 148, A_EP));
        let Opened::Reply(n, _) = a.open(B_EP, &init, &mut buf) else {
            panic!("A answers the greeting")
        };
        let resp = buf[..n].to_vec();
        let Opened::Reply(n, _) = b.open(A_EP, &resp, &mut buf) else {
            panic!("B confirms with a keepalive")
        };
        let keepalive = buf[..n].to_vec();
        assert!(matches!(
            a.open(B_EP, &keepalive, &mut buf),
            Opened::Nothing(_)
        ));
        // A now seals with the new session, which B opens.
        let (r, d) = seal_one(&a, &pkt);
        assert!(matches!(r, Sealed::Data(_)), "{r:?}");
        let Opened::Packet(n, _) = b.open(A_EP, &d, &mut buf) else {
            panic!("B opens A's data on the new session")
        };
        assert_eq!(buf[..n], pkt[..]);
    }

    #[test]
    fn the_key_file_is_made_once_kept_and_refused_when_others_can_read_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("wgkey-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/wgkey");
        let k1 = load_or_create_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o400);
        let k2 = load_or_create_key(&path).unwrap();
        assert_eq!(k1.public(), k2.public(), "a restart keeps the key");
        assert!(!format!("{k1:?}").contains(&key_to_base64(&k1.0.to_bytes())));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_key(&path).unwrap_err().to_string();
        assert!(e.contains("readable by every user"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "bm90IGEga2V5").unwrap();
        let e = load_or_create_key(&path).unwrap_err().to_string();
        assert!(e.contains("is 9 bytes, not 32"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_decode_as_wg_prints_them() {
        let k = [0xabu8; 32];
        let text = key_to_base64(&k);
        assert_eq!(text.len(), 44);
        assert_eq!(key_from_base64(&format!(" {text}\n")), Ok(k));
        assert_eq!(key_from_base64("!!"), Err(KeyError::Base64));
        assert_eq!(key_from_base64("AAAA"), Err(KeyError::Length(3)));
    }
}
