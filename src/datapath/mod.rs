//! The forwarding loops: TUN → UDP and UDP → TUN. Each worker owns one TUN
//! queue, one UDP socket and its buffers, and runs one OS thread per
//! direction; workers share only the lock-free route table and counters.
//!
//! With offloads (`--offload auto`, when the kernel has them) the TUN hands
//! us TCP super-packets of up to 64 KB (`IFF_VNET_HDR` + TSO), which we
//! split into MTU-sized packets sent with one UDP GSO call; received GRO
//! trains are split, and consecutive segments of a TCP flow are coalesced
//! into one super-packet per TUN write. The wire is unchanged: one ordinary
//! IPv4 packet per datagram.

pub mod batch;
pub mod offload;
pub mod tun;
pub mod udp;

use crate::backend::{Decap, Encap};
use crate::forward::{egress, ingress, Counters, DropReason, Egress, IcmpLimit, Ingress, Tally};
use crate::routes::{RouteSnapshot, RouteTable};
use crate::wire::ether::ArpRepr;
use crate::wire::{self, Ipv4Packet};
use batch::{Buf, Mmsg, Slots, BATCH, OFFLOAD_BATCH, SLOT};
use offload::{SegmentPiece, Segments, VnetHdr, GSO_NONE, MAX_GSO_SEGMENTS, VNET_HDR_LEN};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tun::Tun;
pub use udp::bind_udp;
use udp::send_socket;

/// `--offload`: use kernel offloads when available, or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OffloadMode {
    Auto,
    Off,
}

/// `--udp-source-ports`: where our datagrams come from. The destination is
/// always the peer's Backend.Port, the payload the raw IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourcePorts {
    /// Worker k sends from Backend.Port + 1 + k. A flow stays on one worker
    /// (the TUN's queue choice hashes the flow), so the outer source port
    /// carries flow entropy, as VXLAN's does (RFC 7348 §5): a receiver's
    /// SO_REUSEPORT group spreads our flows over its workers. With one
    /// worker this is the same as `fixed`.
    PerWorker,
    /// Every datagram from Backend.Port, as Go flanneld sends.
    Fixed,
}

/// `--worker-threads`: how a worker's two directions are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerThreads {
    /// A thread per direction, each asleep in poll() on its descriptor.
    Split,
    /// One thread polls both descriptors: an answer the kernel queues while
    /// we write to the TUN is sent without waking another thread.
    Combined,
}

/// Most UDP payload bytes one GSO send may carry (the IPv4 64 KB limit,
/// less headers, with a margin).
const GSO_MAX_BYTES: usize = 65_000;

/// What the kernel let us turn on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    /// TUN with `IFF_VNET_HDR` and TSO: super-packets from the kernel, GRO to it.
    pub tun_offload: bool,
    /// UDP/USO super-packets from the TUN too.
    pub tun_uso: bool,
    /// `UDP_SEGMENT` sends.
    pub udp_gso: bool,
    /// `UDP_GRO` receives.
    pub udp_gro: bool,
}

/// The devices of a data path, opened but not yet running.
pub struct Devices {
    pub tun_name: String,
    pub caps: Caps,
    /// Per worker: its TUN queue, its receive socket (in the SO_REUSEPORT
    /// group on Backend.Port) and the socket it sends from.
    queues: Vec<(Tun, UdpSocket, UdpSocket)>,
    /// The source port of each worker's datagrams.
    pub source_ports: Vec<u16>,
}

/// Opens the TUN (with `workers` queues) and one UDP socket per queue bound
/// to `bind` (with `SO_REUSEPORT` when there are several), turning on the
/// offloads `mode` allows and the kernel supports.
pub fn open(
    pattern: &str,
    workers: usize,
    mode: OffloadMode,
    bind: SocketAddrV4,
    sources: SourcePorts,
) -> io::Result<Devices> {
    let workers = workers.max(1);
    let multi_queue = workers > 1 && Tun::takes_multi_queue(pattern);
    let workers = if multi_queue { workers } else { 1 };
    let (first, offloads) = Tun::open_offloaded(pattern, multi_queue, mode == OffloadMode::Auto)?;
    let mut caps = Caps {
        tun_offload: offloads.tso,
        tun_uso: offloads.uso,
        ..Caps::default()
    };
    let mut tuns = vec![first];
    for _ in 1..workers {
        let q = tuns[0].attach()?;
        q.set_offloads(offloads)?;
        tuns.push(q);
    }
    let mut queues = Vec::with_capacity(workers);
    for (k, t) in tuns.into_iter().enumerate() {
        let s = bind_udp(bind, multi_queue)?;
        if mode == OffloadMode::Auto {
            let (gro, gso) = udp::enable_offloads(&s);
            if k == 0 {
                caps.udp_gro = gro;
                caps.udp_gso = gso;
            }
        }
        let tx = if sources == SourcePorts::PerWorker && workers > 1 {
            send_socket(bind, bind.port().wrapping_add(1 + k as u16))?
        } else {
            s.try_clone()?
        };
        queues.push((t, s, tx));
    }
    let tun_name = queues[0].0.name().to_string();
    let source_ports = queues
        .iter()
        .map(|(_, _, tx)| tx.local_addr().map(|a| a.port()).unwrap_or(0))
        .collect();
    Ok(Devices {
        tun_name,
        caps,
        queues,
        source_ports,
    })
}

/// What all workers share with the control plane.
#[derive(Clone)]
pub struct Shared {
    pub routes: Arc<RouteTable>,
    pub counters: Arc<Counters>,
    /// Source address of the ICMP errors we generate: an address inside the
    /// Network that no host owns, so the kernel does not drop the reply as
    /// a martian (flannel uses the TUN's own address and its replies are lost).
    pub icmp_src: Ipv4Addr,
    /// Pin worker k's threads to CPU k (mod the CPU count).
    pub pin: bool,
    /// Skip the sender check on received datagrams (peers behind NAT).
    pub accept_unknown_peers: bool,
    /// One thread per direction per worker, or one for both.
    pub threads: WorkerThreads,
    /// How long a loop keeps polling without sleeping after activity.
    pub busy_poll: Duration,
    /// The backend's encapsulation (udp: none; vxlan: VXLAN + Ethernet).
    pub encap: Encap,
}

/// Restricts the calling thread to one CPU; failure is logged, not fatal.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it; sched_setaffinity(0)
    // affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, error = %io::Error::last_os_error(), "pinning a worker failed");
        }
    }
}

struct Worker {
    tun: Tun,
    /// Receives on Backend.Port.
    sock: UdpSocket,
    /// Sends (see [`SourcePorts`]).
    tx: UdpSocket,
    caps: Caps,
    shared: Shared,
}

impl Worker {
    /// Writes one plain packet to the TUN (behind a zero vnet header if needed).
    #[inline]
    fn tun_write(&self, pkt: &[u8]) -> io::Result<usize> {
        if self.tun.vnet_hdr() {
            self.tun.write2(&[0u8; VNET_HDR_LEN], pkt)
        } else {
            self.tun.write(pkt)
        }
    }
}

/// An eventfd that tells the loops to stop (and a flag a spinning loop checks).
struct StopFd(OwnedFd, std::sync::atomic::AtomicBool);

impl StopFd {
    fn new() -> io::Result<Self> {
        // SAFETY: plain eventfd(2); owned right away.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh valid fd.
        Ok(StopFd(
            unsafe { OwnedFd::from_raw_fd(fd) },
            std::sync::atomic::AtomicBool::new(false),
        ))
    }

    fn is_set(&self) -> bool {
        self.1.load(Ordering::Relaxed)
    }

    fn signal(&self) {
        self.1.store(true, Ordering::Relaxed);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// A `pollfd` waiting for `fd` to be readable.
fn pollin(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Waits until `fd` is readable; false when stop was signalled.
fn wait_readable(fd: RawFd, stop: &StopFd) -> bool {
    let mut fds = [pollin(fd), pollin(stop.0.as_raw_fd())];
    loop {
        // SAFETY: two valid pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return fds[1].revents == 0;
    }
}

/// The running data path; dropping it stops and joins the threads.
pub struct Datapath {
    stop: Arc<StopFd>,
    threads: Vec<JoinHandle<()>>,
    failure: Arc<Failure>,
}

/// The first data-path thread to end on its own (an error it cannot get
/// past, or a panic) records why here and wakes the control plane, which
/// exits non-zero so the supervisor restarts the daemon: a daemon with a
/// dead queue must not go on saying it is healthy.
#[derive(Default)]
struct Failure {
    stopping: std::sync::atomic::AtomicBool,
    why: std::sync::Mutex<Option<String>>,
    notify: tokio::sync::Notify,
}

impl Failure {
    fn record(&self, why: String) {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut w = self.why.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            tracing::error!("data path failed: {why}");
            *w = Some(why);
        }
        drop(w);
        self.notify.notify_one();
    }
}

/// Runs one data-path loop; its end while the data path is not being
/// stopped is a failure, and so is a panic.
fn guarded(name: String, failure: Arc<Failure>, f: impl FnOnce() -> io::Result<()>) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let why = match r {
        Ok(Ok(())) => format!("{name} ended"),
        Ok(Err(e)) => format!("{name}: {e}"),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            format!("{name} panicked: {msg}")
        }
    };
    failure.record(why);
}

impl Datapath {
    pub fn start(devices: Devices, shared: Shared) -> io::Result<Self> {
        let stop = Arc::new(StopFd::new()?);
        let failure = Arc::new(Failure::default());
        let mut threads = Vec::new();
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        for (k, (tun, sock, tx)) in devices.queues.into_iter().enumerate() {
            let cpu = shared.pin.then_some(k % cpus);
            let w = Arc::new(Worker {
                tun,
                sock,
                tx,
                caps: devices.caps,
                shared: shared.clone(),
            });
            let spawn = |name: String, run: fn(&Worker, &StopFd) -> io::Result<()>| {
                let (w, st, f) = (w.clone(), stop.clone(), failure.clone());
                std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || {
                        guarded(name, f, || {
                            if let Some(c) = cpu {
                                pin_to_cpu(c);
                            }
                            run(&w, &st)
                        })
                    })
            };
            match shared.threads {
                WorkerThreads::Split => {
                    threads.push(spawn(format!("tun-to-udp-{k}"), run_split_egress)?);
                    threads.push(spawn(format!("udp-to-tun-{k}"), run_split_ingress)?);
                }
                WorkerThreads::Combined => {
                    threads.push(spawn(format!("worker-{k}"), run_combined)?);
                }
            }
        }
        Ok(Datapath {
            stop,
            threads,
            failure,
        })
    }

    /// Resolves when a data-path thread has failed, with the reason.
    pub async fn failed(&self) -> String {
        loop {
            let notified = self.failure.notify.notified();
            if let Some(why) = self
                .failure
                .why
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return why;
            }
            notified.await;
        }
    }

    /// Whether a data-path thread has failed.
    pub fn is_failed(&self) -> bool {
        self.failure
            .why
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.failure.stopping.store(true, Ordering::SeqCst);
        self.stop.signal();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.shutdown();
    }
}

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

/// What one egress thread needs to answer with ICMP errors.
struct Icmp {
    out: [u8; wire::ICMP_ERROR_MAX],
    limit: IcmpLimit,
}

impl Icmp {
    fn new() -> Self {
        Icmp {
            out: [0u8; wire::ICMP_ERROR_MAX],
            limit: IcmpLimit::default(),
        }
    }
}

/// Answers a packet we cannot forward with an ICMP error into the TUN,
/// within the rate limit.
fn icmp_reply(w: &Worker, offender: &[u8], answer: (u8, u8), icmp: &mut Icmp, t: &mut Tally) {
    if !icmp.limit.allow(Instant::now()) {
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

/// A direction's drain: handles what is queued on its descriptor without
/// blocking and returns how many packets (or datagrams) it read.
type Drain<'a> = Box<dyn FnMut() -> io::Result<usize> + 'a>;

/// After a drain that found work, keeps draining without sleeping until
/// `window` passes with nothing new (`--busy-poll`): the next packet of an
/// exchange (a ping's reply, a TCP ACK) is then picked up without a
/// wake-up. Zero: never spins.
fn busy_window(
    window: Duration,
    stop: &StopFd,
    mut step: impl FnMut() -> io::Result<usize>,
) -> io::Result<()> {
    if window.is_zero() {
        return Ok(());
    }
    let mut until = Instant::now() + window;
    while !stop.is_set() {
        if step()? > 0 {
            until = Instant::now() + window;
        } else if Instant::now() >= until {
            break;
        } else {
            std::hint::spin_loop();
        }
    }
    Ok(())
}

/// One thread per direction: each sleeps in poll() on its own descriptor.
fn run_split_egress(w: &Worker, stop: &StopFd) -> io::Result<()> {
    let mut drain = tun_to_udp(w);
    while wait_readable(w.tun.as_raw_fd(), stop) {
        if drain()? > 0 {
            busy_window(w.shared.busy_poll, stop, &mut drain)?;
        }
    }
    Ok(())
}

fn run_split_ingress(w: &Worker, stop: &StopFd) -> io::Result<()> {
    let mut drain = udp_to_tun(w);
    while wait_readable(w.sock.as_raw_fd(), stop) {
        if drain()? > 0 {
            busy_window(w.shared.busy_poll, stop, &mut drain)?;
        }
    }
    Ok(())
}

/// One thread for both directions, polling both descriptors: a packet
/// written to the TUN whose answer the kernel queues right back (a ping's
/// reply, a TCP ACK) is picked up without waking another thread.
fn run_combined(w: &Worker, stop: &StopFd) -> io::Result<()> {
    let mut egress = tun_to_udp(w);
    let mut ingress = udp_to_tun(w);
    let mut fds = [
        pollin(w.tun.as_raw_fd()),
        pollin(w.sock.as_raw_fd()),
        pollin(stop.0.as_raw_fd()),
    ];
    loop {
        for f in &mut fds {
            f.revents = 0;
        }
        // SAFETY: three valid pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[2].revents != 0 {
            return Ok(());
        }
        let mut got = 0;
        if fds[1].revents != 0 {
            got += ingress()?;
        }
        if fds[0].revents != 0 {
            got += egress()?;
        }
        if got > 0 {
            busy_window(w.shared.busy_poll, stop, || Ok(ingress()? + egress()?))?;
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
fn tun_to_udp(w: &Worker) -> Drain<'_> {
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
                let Ok(segs) = Segments::of(pkt, &hdr) else {
                    t.drop(DropReason::Malformed);
                    continue;
                };
                t.udp_tx_bytes += segs.total() as u64;
                let dgram = segs.seg_len() + pre;
                // One GSO send carries at most 64 segments and 64 KB.
                let per = if w.caps.udp_gso && segs.count() > 1 && gso_off.allows(*peer.addr.ip()) {
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
                    if !mmsg.has_room_for(chunk.len().div_ceil(per), pieces)
                        || hoff + bytes > headers.len()
                    {
                        flush(&mut mmsg, sock, rx.bytes_mut(), &mut headers, &mut t);
                        gso_off.refused(&mmsg.gso_refused);
                        hoff = 0;
                    }
                    let pkt = &rx.packet(i)[vnet..];
                    let area = &mut headers[hoff..hoff + bytes];
                    encap.write_prefix(peer.mac, area);
                    segs.write_headers(pkt, chunk.clone(), &mut area[pre..])
                        .expect("room checked above");
                    let prefix = (pre > 0).then_some((Buf::Aux, hoff, pre));
                    let hdrs = hoff + pre;
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
            flush(&mut mmsg, sock, rx.bytes_mut(), &mut headers, &mut t);
            gso_off.refused(&mmsg.gso_refused);
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

/// Sends what is queued, counting datagrams sent and failed.
fn flush(mmsg: &mut Mmsg, sock: RawFd, main: &mut [u8], aux: &mut [u8], t: &mut Tally) {
    if mmsg.queued() > 0 {
        let r = mmsg.send(sock, main, aux);
        t.udp_tx_packets += r.sent as u64;
        t.drop_n(DropReason::SendError, r.failed as u64);
        t.gso_fallbacks += r.fallbacks as u64;
    }
}

/// How long a peer whose GSO send the kernel refused gets plain datagrams:
/// as long as the kernel keeps a learned path MTU (`ip_rt_mtu_expires`).
const GSO_OFF_FOR: Duration = Duration::from_secs(600);

/// The peers one worker sends to without UDP GSO for now, because the
/// kernel refused a GSO send to them (the path MTU to them is below the
/// segment size, or an IPsec policy cannot segment). Each entry expires,
/// so a path that recovers gets GSO back.
struct GsoOff {
    until: Vec<(Ipv4Addr, Instant)>,
    counters: Arc<Counters>,
}

impl GsoOff {
    fn new(counters: Arc<Counters>) -> Self {
        GsoOff {
            until: Vec::new(),
            counters,
        }
    }

    /// Whether GSO may be used towards `ip` now.
    #[inline]
    fn allows(&mut self, ip: Ipv4Addr) -> bool {
        if self.until.is_empty() {
            return true;
        }
        let now = Instant::now();
        let before = self.until.len();
        self.until.retain(|&(_, t)| t > now);
        let expired = (before - self.until.len()) as u64;
        if expired > 0 {
            self.counters
                .gso_off_peers
                .fetch_sub(expired, Ordering::Relaxed);
        }
        !self.until.iter().any(|&(p, _)| p == ip)
    }

    /// Turns GSO off towards the peers whose GSO sends were refused.
    fn refused(&mut self, peers: &[SocketAddrV4]) {
        for p in peers {
            let ip = *p.ip();
            if self.until.iter().any(|&(q, _)| q == ip) {
                continue;
            }
            tracing::warn!(peer = %ip, "the kernel refused a UDP GSO send (a path MTU below the segment size, or an IPsec policy); resent as plain datagrams, and GSO stays off for this peer for {} s", GSO_OFF_FOR.as_secs());
            self.until.push((ip, Instant::now() + GSO_OFF_FOR));
            self.counters.gso_off_peers.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Datagrams (or GRO trains) in batches; each inner packet validated; with
/// a vnet TUN, runs of one TCP flow are coalesced into one write.
fn udp_to_tun(w: &Worker) -> Drain<'_> {
    let batch = if w.caps.udp_gro { OFFLOAD_BATCH } else { BATCH };
    let mut slots = Slots::new(batch, SLOT);
    let mut mmsg = Mmsg::new(batch, batch);
    // (offset, length) of each deliverable packet in the batch.
    let mut pkts: Vec<(usize, usize)> = Vec::with_capacity(batch * MAX_GSO_SEGMENTS);
    let mut gro_head = [0u8; VNET_HDR_LEN + 120];
    let mut gro = offload::GroTable::new();
    let sock = w.sock.as_raw_fd();
    let encap = w.shared.encap;
    Box::new(move || {
        let mut got = 0;
        loop {
            let n = match mmsg.recv(sock, &mut slots) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    // e.g. ECONNREFUSED from an ICMP error about an earlier send.
                    tracing::debug!(error = %e, "UDP receive error");
                    continue;
                }
            };
            if n == 0 {
                break;
            }
            got += n;
            let mut t = Tally::default();
            pkts.clear();
            let routes = w.shared.routes.load();
            let accept = w.shared.accept_unknown_peers;
            for i in 0..n {
                let from = *slots.addr[i].ip();
                let (start, len) = (slots.start(i), slots.len[i]);
                let seg = if slots.gso[i] == 0 {
                    len.max(1)
                } else {
                    slots.gso[i]
                };
                t.udp_rx_bytes += len as u64;
                if len == 0 {
                    t.udp_rx_packets += 1;
                    t.drop(DropReason::Malformed);
                    continue;
                }
                let buf = slots.bytes_mut();
                let mut off = 0;
                while off < len {
                    let l = seg.min(len - off);
                    t.udp_rx_packets += 1;
                    let d = &mut buf[start + off..start + off + l];
                    match encap.decap(d) {
                        Decap::Packet(inner) => {
                            match ingress(&mut d[inner..], from, &routes, accept) {
                                Ingress::Deliver => pkts.push((start + off + inner, l - inner)),
                                Ingress::Drop(r) => t.drop(r),
                            }
                        }
                        Decap::Arp(req) => arp_reply(w, &req, from, &routes, &mut t),
                        Decap::Drop(r) => t.drop(r),
                    }
                    off += l;
                }
            }
            write_tun(w, slots.bytes(), &pkts, &mut gro, &mut gro_head, &mut t);
            w.shared.counters.ingress.add(&t);
            w.shared.counters.rx_batch(t.udp_rx_packets as usize);
            if n < slots.count() {
                break;
            }
        }
        Ok(got)
    })
}

/// Answers an ARP request for our VTEP address from a known peer (a kernel
/// VXLAN node asks when its neighbour entry for us is missing).
fn arp_reply(w: &Worker, req: &ArpRepr, from: Ipv4Addr, routes: &RouteSnapshot, t: &mut Tally) {
    let Some(own) = routes.local() else {
        return;
    };
    let sender = routes.lookup(req.sender_ip);
    match w.shared.encap.arp_answer(req, own.network(), from, sender) {
        Some(answer) => {
            let to = sender.expect("answered only for a known sender").addr;
            if w.tx.send_to(&answer, to).is_ok() {
                t.arp_replies += 1;
            }
        }
        None => t.drop(DropReason::Spoofed),
    }
}

/// Writes the batch's packets to the TUN, coalescing each TCP flow's runs
/// (across interleaved flows, see [`offload::GroTable`]) when the TUN takes
/// vnet headers: one header built in `head`, the payloads gathered from
/// where they were received (no copy).
fn write_tun(
    w: &Worker,
    buf: &[u8],
    pkts: &[(usize, usize)],
    gro: &mut offload::GroTable,
    head: &mut [u8],
    t: &mut Tally,
) {
    let slice = |&(s, l): &(usize, usize)| &buf[s..s + l];
    if !w.tun.vnet_hdr() {
        for p in pkts {
            if w.tun_write(slice(p)).is_ok() {
                t.tun_tx_packets += 1;
            } else {
                t.drop(DropReason::TunWriteError);
            }
        }
        return;
    }
    gro.group(pkts.len(), |i| slice(&pkts[i]));
    for k in 0..gro.items() {
        let item = gro.item(k);
        let run = item.len();
        let ok = if run > 1 {
            let run_pkts = item.map(|i| slice(&pkts[i]));
            match offload::coalesce_header(run_pkts.clone(), head) {
                Ok((hl, h)) => w
                    .tun
                    .write_gather(&head[..hl], run_pkts.map(|p| &p[h..]))
                    .is_ok(),
                Err(_) => false,
            }
        } else {
            let i = item.clone().next().expect("an item has a packet");
            w.tun_write(slice(&pkts[i])).is_ok()
        };
        if ok {
            t.tun_tx_packets += run as u64;
        } else {
            t.drop_n(DropReason::TunWriteError, run as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_window_spins_while_work_comes_and_ends_when_it_stops() {
        let stop = StopFd::new().unwrap();
        let mut calls = 0;
        busy_window(Duration::ZERO, &stop, || {
            calls += 1;
            Ok(1)
        })
        .unwrap();
        assert_eq!(calls, 0, "a zero window never spins");

        // Work for the first 5 steps, then none: the window ends on its own.
        let mut calls = 0;
        busy_window(Duration::from_millis(2), &stop, || {
            calls += 1;
            Ok(usize::from(calls <= 5))
        })
        .unwrap();
        assert!(calls > 5, "{calls}");

        // Endless work: only the stop flag ends it.
        let mut calls = 0;
        let r = busy_window(Duration::from_millis(2), &stop, || {
            calls += 1;
            if calls == 1000 {
                stop.signal();
            }
            Ok(1)
        });
        assert!(r.is_ok());
        assert_eq!(calls, 1000);

        // An error ends it with the error.
        let stop = StopFd::new().unwrap();
        let r = busy_window(Duration::from_millis(2), &stop, || {
            Err(io::Error::other("gone"))
        });
        assert_eq!(r.unwrap_err().to_string(), "gone");
    }

    #[test]
    fn a_loop_that_ends_errs_or_panics_is_a_failure_unless_stopping() {
        let f = Arc::new(Failure::default());
        guarded("a".into(), f.clone(), || Err(io::Error::other("boom")));
        assert_eq!(f.why.lock().unwrap().as_deref(), Some("a: boom"));
        // The first failure is kept.
        guarded("b".into(), f.clone(), || panic!("later"));
        assert_eq!(f.why.lock().unwrap().as_deref(), Some("a: boom"));

        let f = Arc::new(Failure::default());
        guarded("c".into(), f.clone(), || panic!("index out of bounds"));
        assert_eq!(
            f.why.lock().unwrap().as_deref(),
            Some("c panicked: index out of bounds")
        );

        // Ending while the data path is being stopped is not a failure.
        let f = Arc::new(Failure::default());
        f.stopping.store(true, Ordering::SeqCst);
        guarded("d".into(), f.clone(), || Ok(()));
        assert!(f.why.lock().unwrap().is_none());
    }
}
