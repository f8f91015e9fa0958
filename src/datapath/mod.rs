//! The forwarding loops: TUN → UDP and UDP → TUN. Each worker owns one TUN
//! queue, one UDP socket and its buffers, and runs one OS thread per
//! direction; workers share only the lock-free route table and counters.
//!
//! With offloads (`--offload auto`, when the kernel has them) the TUN hands
//! us TCP super-packets of up to 64 KB (`IFF_VNET_HDR` + TSO), which we
//! split into MTU-sized packets sent with one UDP GSO call; received GRO
//! trains are split, and consecutive segments of a TCP flow are coalesced
//! into one super-packet per TUN write. The wire is the backend's: one
//! IPv4 packet per datagram, behind the prefix the [`Encap`] in [`Shared`]
//! gives (nothing on udp, VXLAN + Ethernet on vxlan); the loops are the
//! same for every backend.
//!
//! [`setup`] opens the devices, [`egress`] is TUN → UDP, [`ingress`] is
//! UDP → TUN; this file runs and stops the worker threads.

pub mod batch;
mod egress;
mod ingress;
pub mod offload;
mod setup;
pub mod tun;
pub mod udp;

pub use setup::{open, Caps, Devices, OffloadMode, SourcePorts, WorkerThreads};

use crate::backend::Encap;
use crate::forward::Counters;
use crate::routes::RouteTable;
use egress::tun_to_udp;
use ingress::udp_to_tun;
use offload::VNET_HDR_LEN;
use std::io;
use std::net::Ipv4Addr;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tun::Tun;
pub use udp::bind_udp;

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
    /// One ICMP-error rate limit for the whole data path (as the kernel
    /// has one per host), however many workers: taken only on the rare
    /// path that answers with an ICMP error.
    pub icmp_limit: Arc<std::sync::Mutex<crate::forward::IcmpLimit>>,
    /// The wireguard backend's peers and keys (with `Encap::Wireguard`).
    pub wg: Option<Arc<crate::wireguard::Wg>>,
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

pub(crate) struct Worker {
    /// Which worker this is (its TUN queue and place in the socket group).
    index: usize,
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

/// Sleeps `d` or until stop is signalled; true when it was.
fn wait_stop(stop: &StopFd, d: Duration) -> bool {
    let mut fds = [pollin(stop.0.as_raw_fd())];
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(fds.as_mut_ptr(), 1, d.as_millis() as libc::c_int) };
    stop.is_set()
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
        if let (Some(wg), Some((_, _, tx))) = (shared.wg.clone(), devices.queues.first()) {
            // WireGuard's timers (handshake retries, rekeys, keepalives),
            // sending from ListenPort like the workers.
            let tx = tx.try_clone()?;
            let (st, f) = (stop.clone(), failure.clone());
            threads.push(std::thread::Builder::new().name("wg-timers".into()).spawn(
                move || {
                    guarded("wg-timers".into(), f, || {
                        let mut out = vec![0u8; 256];
                        while !wait_stop(&st, crate::wireguard::TICK) {
                            wg.tick(&mut out, |d, to| {
                                let _ = tx.send_to(d, to);
                            });
                        }
                        Ok(())
                    })
                },
            )?);
        }
        shared
            .counters
            .workers
            .store(devices.queues.len() as u64, Ordering::Relaxed);
        for (k, (tun, sock, tx)) in devices.queues.into_iter().enumerate() {
            let cpu = shared.pin.then_some(k % cpus);
            let w = Arc::new(Worker {
                index: k,
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

/// A direction's drain: handles what is queued on its descriptor without
/// blocking and returns how many packets (or datagrams) it read.
pub(crate) type Drain<'a> = Box<dyn FnMut() -> io::Result<usize> + 'a>;

/// After a drain that found work, keeps draining without sleeping until
/// `window` passes with nothing new (`--busy-poll`): the next packet of an
/// exchange (a ping's reply, a TCP ACK) is then picked up without a
/// wake-up (a halted vCPU costs an IPI through the hypervisor to wake).
/// Between drains the thread yields its CPU. Zero: never polls.
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
            // Yield, not spin: a runnable thread on this CPU (the
            // application the packets are for, the other direction's
            // thread) runs now instead of waiting for our window to end,
            // and with nothing else runnable this returns at once. On
            // 2 vCPUs: TCP-1 +23 %, UDP 64 B +40 % against a spin (the
            // docs/benchmarks.md, 2026-12-06).
            // SAFETY: no arguments, no memory.
            unsafe { libc::sched_yield() };
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
