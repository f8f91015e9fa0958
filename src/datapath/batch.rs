//! Batched UDP I/O: `recvmmsg`/`sendmmsg`, with UDP GSO (`UDP_SEGMENT`) on
//! send and UDP GRO on receive, over buffers allocated once per worker.
//! Nothing here allocates per packet or per batch.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;

/// Packets per batch without offloads.
pub const BATCH: usize = 64;
/// Super-packets (up to 64 KB each) per batch with offloads.
pub const OFFLOAD_BATCH: usize = 16;
/// Bytes per slot: the largest IPv4 packet plus a vnet header. Untouched
/// pages of a slot are never faulted in, so resident memory follows the
/// real packet sizes.
pub const SLOT: usize = 65536 + 64;

pub const SOL_UDP: libc::c_int = 17;
pub const UDP_SEGMENT: libc::c_int = 103;
pub const UDP_GRO: libc::c_int = 104;

/// `count` packet buffers in one allocation, with per-slot length, peer
/// address and (on receive) the GRO segment size.
pub struct Slots {
    buf: Vec<u8>,
    size: usize,
    pub len: Vec<usize>,
    pub addr: Vec<SocketAddrV4>,
    /// Segment size of a GRO-coalesced receive (0: one datagram).
    pub gso: Vec<usize>,
}

impl Slots {
    pub fn new(count: usize, size: usize) -> Self {
        Slots {
            buf: vec![0u8; count * size],
            size,
            len: vec![0; count],
            addr: vec![SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0); count],
            gso: vec![0; count],
        }
    }

    pub fn count(&self) -> usize {
        self.len.len()
    }

    /// Offset of slot `i` in [`Slots::bytes`].
    #[inline]
    pub fn start(&self, i: usize) -> usize {
        i * self.size
    }

    /// The whole slot `i`, for reading into.
    #[inline]
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        let s = i * self.size;
        &mut self.buf[s..s + self.size]
    }

    /// The packet in slot `i`.
    #[inline]
    pub fn packet(&self, i: usize) -> &[u8] {
        let s = i * self.size;
        &self.buf[s..s + self.len[i]]
    }

    #[inline]
    pub fn packet_mut(&mut self, i: usize) -> &mut [u8] {
        let s = i * self.size;
        &mut self.buf[s..s + self.len[i]]
    }

    /// All slots as one buffer (ranges from [`Slots::start`]).
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    #[inline]
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

fn to_sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)),
        u16::from_be(s.sin_port),
    )
}

/// Room for one cmsg carrying an int (CMSG_SPACE(4) is 16 on 64-bit).
const CTRL: usize = 32;

/// A control-message buffer aligned for `cmsghdr` (its `size_t` length),
/// as the kernel and the CMSG_* macros expect.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Ctrl([u8; CTRL]);
const _: () = assert!(std::mem::align_of::<Ctrl>() >= std::mem::align_of::<libc::cmsghdr>());

/// Which buffer a piece of an outgoing message lies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buf {
    /// The first buffer given to [`Mmsg::send`] (packets).
    Main,
    /// The second one (e.g. segment headers built beside the packets).
    Aux,
}

#[derive(Clone, Copy)]
struct Piece {
    buf: Buf,
    start: usize,
    len: usize,
}

#[derive(Clone, Copy)]
struct Queued {
    /// Range of `pieces` forming this message.
    first: usize,
    count: usize,
    len: usize,
    addr: SocketAddrV4,
    /// UDP GSO segment size; 0 sends `len` bytes as one datagram.
    gso: u16,
}

/// The kernel-facing message headers of one batch. Pointers into the
/// caller's buffers are set right before each syscall, so they never dangle.
pub struct Mmsg {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_in>,
    ctrl: Vec<Ctrl>,
    queue: Vec<Queued>,
    pieces: Vec<Piece>,
    /// Peers of the GSO sends the last [`Mmsg::send`] had to resend as
    /// plain datagrams (each at most once).
    pub gso_refused: Vec<SocketAddrV4>,
}

/// What one [`Mmsg::send`] did, in datagrams.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub sent: usize,
    pub failed: usize,
    /// GSO messages the kernel refused and that went out as plain datagrams.
    pub fallbacks: usize,
}

/// Errors with which the kernel refuses a UDP GSO send that plain
/// datagrams of the same bytes would survive: a segment above the path
/// MTU (EINVAL), over the size limits (EMSGSIZE), or an IPsec/xfrm path
/// that cannot segment (EIO).
fn gso_refusal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EMSGSIZE | libc::EIO)
    )
}

// SAFETY: the raw pointers inside are only meaningful during a syscall made
// by the owning thread; they are rewritten before every use.
unsafe impl Send for Mmsg {}

impl Mmsg {
    /// Room for `cap` messages and `pieces` gathered pieces per call.
    pub fn new(cap: usize, pieces: usize) -> Self {
        // SAFETY: plain C structs; all-zero is a valid value.
        let zero_hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        let zero_iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let pieces = pieces.max(cap);
        Mmsg {
            hdrs: vec![zero_hdr; cap],
            iovs: vec![zero_iov; pieces],
            names: vec![to_sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); cap],
            ctrl: vec![Ctrl([0u8; CTRL]); cap],
            queue: Vec::with_capacity(cap),
            pieces: Vec::with_capacity(pieces),
            gso_refused: Vec::with_capacity(8),
        }
    }

    /// Receives up to one datagram (or GRO train) per slot without
    /// blocking; returns how many slots were filled.
    pub fn recv(&mut self, fd: RawFd, slots: &mut Slots) -> io::Result<usize> {
        let n = slots.count().min(self.hdrs.len());
        for i in 0..n {
            let s = slots.slot_mut(i);
            self.iovs[i] = libc::iovec {
                iov_base: s.as_mut_ptr().cast(),
                iov_len: s.len(),
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].0.as_mut_ptr().cast();
            h.msg_controllen = CTRL;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: hdrs[..n] point at live buffers owned by self and slots.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = got as usize;
        for i in 0..got {
            let h = &self.hdrs[i].msg_hdr;
            let truncated = h.msg_flags & libc::MSG_TRUNC != 0;
            // A truncated datagram fails the length check downstream.
            slots.len[i] = if truncated {
                0
            } else {
                self.hdrs[i].msg_len as usize
            };
            slots.addr[i] = from_sockaddr(&self.names[i]);
            slots.gso[i] = gro_size(h);
        }
        Ok(got)
    }

    pub fn clear(&mut self) {
        self.queue.clear();
        self.pieces.clear();
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether another message of `pieces` pieces fits.
    pub fn has_room(&self, pieces: usize) -> bool {
        self.has_room_for(1, pieces)
    }

    /// Whether `messages` more messages with `pieces` pieces in all fit:
    /// both the message slots and the iovecs are bounded.
    pub fn has_room_for(&self, messages: usize, pieces: usize) -> bool {
        self.queue.len() + messages <= self.hdrs.len()
            && self.pieces.len() + pieces <= self.iovs.len()
    }

    /// Queues `len` bytes at `start` of the main buffer for `addr`.
    #[inline]
    pub fn queue(&mut self, start: usize, len: usize, addr: SocketAddrV4) {
        self.queue_gather([(Buf::Main, start, len)], addr, 0);
    }

    /// Queues one message gathered from pieces, split by the kernel into
    /// datagrams of `gso` bytes when `gso` is non-zero (UDP GSO).
    #[inline]
    pub fn queue_gather(
        &mut self,
        pieces: impl IntoIterator<Item = (Buf, usize, usize)>,
        addr: SocketAddrV4,
        gso: u16,
    ) {
        let first = self.pieces.len();
        let mut len = 0;
        for (buf, start, l) in pieces {
            self.pieces.push(Piece { buf, start, len: l });
            len += l;
        }
        let count = self.pieces.len() - first;
        self.queue.push(Queued {
            first,
            count,
            len,
            addr,
            gso,
        });
    }

    /// Sends every queued message with as few `sendmmsg` calls as the
    /// kernel allows. A message the kernel refuses is skipped and counted,
    /// the rest still go out; a refused UDP GSO message (see
    /// `gso_refusal`) is resent as plain datagrams, which the kernel
    /// fragments where the path needs it, and its peer is noted in
    /// [`Mmsg::gso_refused`].
    pub fn send(&mut self, fd: RawFd, main: &mut [u8], aux: &mut [u8]) -> Sent {
        self.gso_refused.clear();
        let total = self.queue.len();
        for (i, p) in self.pieces.iter().enumerate() {
            let b: &mut [u8] = match p.buf {
                Buf::Main => &mut main[p.start..p.start + p.len],
                Buf::Aux => &mut aux[p.start..p.start + p.len],
            };
            self.iovs[i] = libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            };
        }
        for (k, q) in self.queue.iter().enumerate() {
            self.names[k] = to_sockaddr(q.addr);
            let h = &mut self.hdrs[k].msg_hdr;
            h.msg_name = (&mut self.names[k] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            h.msg_iov = &mut self.iovs[q.first];
            h.msg_iovlen = q.count;
            h.msg_flags = 0;
            if q.gso != 0 {
                h.msg_control = self.ctrl[k].0.as_mut_ptr().cast();
                h.msg_controllen = put_cmsg_u16(&mut self.ctrl[k], SOL_UDP, UDP_SEGMENT, q.gso);
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
        }
        let datagrams = |q: &Queued| {
            if q.gso == 0 {
                1
            } else {
                q.len.div_ceil(q.gso as usize)
            }
        };
        let (mut done, mut sent, mut failed, mut fallbacks) = (0usize, 0usize, 0usize, 0usize);
        while done < total {
            // SAFETY: hdrs[done..total] were filled above and point at live buffers.
            let n = unsafe {
                libc::sendmmsg(fd, self.hdrs[done..].as_mut_ptr(), (total - done) as u32, 0)
            };
            if n > 0 {
                sent += self.queue[done..done + n as usize]
                    .iter()
                    .map(datagrams)
                    .sum::<usize>();
                done += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    // Socket buffer full: wait until writable, then retry.
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                    if pfd.revents & libc::POLLOUT == 0 {
                        failed += self.queue[done..].iter().map(datagrams).sum::<usize>();
                        break;
                    }
                }
                _ if self.queue[done].gso != 0 && gso_refusal(&e) => {
                    let q = self.queue[done];
                    let (ok, bad) = self.send_plain(fd, done);
                    sent += ok;
                    failed += bad;
                    fallbacks += 1;
                    if !self.gso_refused.contains(&q.addr) {
                        self.gso_refused.push(q.addr);
                    }
                    done += 1;
                }
                // This message cannot be sent (e.g. unreachable peer): skip it.
                _ => {
                    failed += datagrams(&self.queue[done]);
                    done += 1;
                }
            }
        }
        self.clear();
        Sent {
            sent,
            failed,
            fallbacks,
        }
    }

    /// Sends queued GSO message `k` as one datagram per segment: `gso`
    /// bytes at a time across its pieces (whose iovecs are set). Returns
    /// (sent, failed).
    fn send_plain(&mut self, fd: RawFd, k: usize) -> (usize, usize) {
        let q = self.queue[k];
        let seg = q.gso as usize;
        let iovs = &self.iovs[q.first..q.first + q.count];
        // At most a handful of pieces make one segment (header + data, or
        // data split across pieces): gather them in a small array.
        let mut parts = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 8];
        let (mut piece, mut off) = (0usize, 0usize);
        let (mut sent, mut failed) = (0, 0);
        let mut name = to_sockaddr(q.addr);
        let mut left = q.len;
        while left > 0 {
            let want = seg.min(left);
            let (mut n, mut got) = (0, 0);
            while got < want && n < parts.len() {
                let iov = iovs[piece];
                let take = (iov.iov_len - off).min(want - got);
                // SAFETY: within the piece's live buffer, set by send().
                parts[n] = libc::iovec {
                    iov_base: unsafe { iov.iov_base.cast::<u8>().add(off) }.cast(),
                    iov_len: take,
                };
                n += 1;
                got += take;
                off += take;
                if off == iov.iov_len {
                    piece += 1;
                    off = 0;
                }
            }
            left -= got;
            // SAFETY: all-zero msghdr, then valid name and iovecs.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = (&mut name as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            h.msg_iov = parts.as_mut_ptr();
            h.msg_iovlen = n;
            // SAFETY: h points at live buffers for the call.
            let rc = unsafe { libc::sendmsg(fd, &h, 0) };
            if rc >= 0 && got == want {
                sent += 1;
            } else {
                failed += 1;
            }
        }
        (sent, failed)
    }
}

/// Writes one cmsg with a u16 payload; returns the control length to use.
fn put_cmsg_u16(ctrl: &mut Ctrl, level: libc::c_int, ty: libc::c_int, v: u16) -> usize {
    let ctrl = &mut ctrl.0;
    ctrl.fill(0);
    // SAFETY: CMSG_LEN/CMSG_SPACE are pure arithmetic.
    let (len, space) = unsafe { (libc::CMSG_LEN(2) as usize, libc::CMSG_SPACE(2) as usize) };
    let hdr = libc::cmsghdr {
        cmsg_len: len as _,
        cmsg_level: level,
        cmsg_type: ty,
    };
    // SAFETY: ctrl has room for a cmsghdr (CTRL ≥ CMSG_SPACE(2)) and is
    // 8-byte aligned (Ctrl).
    unsafe { std::ptr::write(ctrl.as_mut_ptr().cast::<libc::cmsghdr>(), hdr) };
    let at = std::mem::size_of::<libc::cmsghdr>();
    ctrl[at..at + 2].copy_from_slice(&v.to_ne_bytes());
    space
}

/// The UDP_GRO segment size in a received message's control data, or 0.
fn gro_size(h: &libc::msghdr) -> usize {
    if h.msg_control.is_null() || h.msg_controllen == 0 {
        return 0;
    }
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of
    // well-formed cmsgs; the CMSG_* helpers stay within them.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return v.max(0) as usize;
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    0
}

/// Sets an int socket option, for UDP_GRO and the UDP_SEGMENT probe.
pub fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a valid int of the stated size.
    let rc = unsafe { libc::setsockopt(fd, level, name, (&v as *const libc::c_int).cast(), 4) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn pair() -> (UdpSocket, UdpSocket, SocketAddrV4) {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = match rx.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        (tx, rx, to)
    }

    /// Receives until `want` slots are filled (or 2 s pass).
    fn recv_all(rx: &UdpSocket, want: usize) -> (Slots, usize) {
        let mut slots = Slots::new(BATCH, 2048);
        let mut m = Mmsg::new(BATCH, BATCH);
        let mut got = 0;
        let t = std::time::Instant::now();
        while got < want && t.elapsed() < Duration::from_secs(2) {
            // Receive into a scratch set, then move the packets up.
            let mut s = Slots::new(BATCH, 2048);
            match m.recv(rx.as_raw_fd(), &mut s) {
                Ok(n) => {
                    for i in 0..n {
                        let len = s.len[i];
                        slots.slot_mut(got)[..len].copy_from_slice(&s.slot_mut(i)[..len]);
                        slots.len[got] = len;
                        slots.addr[got] = s.addr[i];
                        slots.gso[got] = s.gso[i];
                        got += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("recvmmsg: {e}"),
            }
        }
        (slots, got)
    }

    #[test]
    fn a_batch_goes_out_in_order_and_comes_back_with_lengths_and_senders() {
        let (tx, rx, to) = pair();
        let mut main = vec![0u8; 64 * 100];
        let mut m = Mmsg::new(BATCH, BATCH);
        for k in 0..10 {
            let len = 20 + k * 7;
            main[k * 100..k * 100 + len].fill(k as u8 + 1);
            assert!(m.has_room(1));
            m.queue(k * 100, len, to);
        }
        assert_eq!(m.queued(), 10);
        assert_eq!(
            m.send(tx.as_raw_fd(), &mut main, &mut []),
            Sent {
                sent: 10,
                failed: 0,
                fallbacks: 0
            }
        );
        assert_eq!(m.queued(), 0, "send clears the batch");
        let (slots, got) = recv_all(&rx, 10);
        assert_eq!(got, 10);
        let from = tx.local_addr().unwrap();
        for k in 0..10 {
            assert_eq!(slots.len[k], 20 + k * 7);
            assert!(
                slots.packet(k).iter().all(|&b| b == k as u8 + 1),
                "datagram {k}"
            );
            assert_eq!(std::net::SocketAddr::V4(slots.addr[k]), from);
            assert_eq!(slots.gso[k], 0);
        }
    }

    #[test]
    fn gathered_pieces_with_gso_become_segment_sized_datagrams() {
        let (tx, rx, to) = pair();
        // One message: 30 header bytes from the aux buffer, 320 from main,
        // cut by the kernel into 100-byte datagrams: 100, 100, 100, 50.
        let mut aux: Vec<u8> = (0..30u8).collect();
        let mut main: Vec<u8> = (0..320u32).map(|i| (i + 30) as u8).collect();
        let mut m = Mmsg::new(4, 8);
        m.queue_gather([(Buf::Aux, 0, 30), (Buf::Main, 0, 320)], to, 100);
        assert_eq!(m.send(tx.as_raw_fd(), &mut main, &mut aux).sent, 4);
        let (slots, got) = recv_all(&rx, 4);
        assert_eq!(got, 4);
        let mut all = Vec::new();
        for k in 0..4 {
            assert_eq!(slots.len[k], if k < 3 { 100 } else { 50 });
            all.extend_from_slice(slots.packet(k));
        }
        assert_eq!(all, (0..350u32).map(|i| i as u8).collect::<Vec<_>>());
    }

    #[test]
    fn a_gro_receive_reports_the_segment_size() {
        let (tx, rx, to) = pair();
        set_int_opt(rx.as_raw_fd(), SOL_UDP, UDP_GRO, 1).unwrap();
        let mut main = vec![7u8; 300];
        let mut m = Mmsg::new(1, 1);
        m.queue_gather([(Buf::Main, 0, 300)], to, 100);
        assert_eq!(m.send(tx.as_raw_fd(), &mut main, &mut []).sent, 3);
        let (slots, got) = recv_all(&rx, 1);
        assert_eq!(got, 1, "one GRO train");
        assert_eq!((slots.len[0], slots.gso[0]), (300, 100));
    }

    #[test]
    fn a_refused_message_is_counted_and_the_rest_still_go_out() {
        let (tx, rx, to) = pair();
        let mut main = vec![1u8; 300];
        let mut m = Mmsg::new(3, 3);
        m.queue(0, 100, to);
        // Broadcast without SO_BROADCAST: EACCES for this message only.
        m.queue(100, 100, SocketAddrV4::new(Ipv4Addr::BROADCAST, to.port()));
        m.queue(200, 100, to);
        assert!(!m.has_room(1), "three message slots, three queued");
        assert_eq!(
            m.send(tx.as_raw_fd(), &mut main, &mut []),
            Sent {
                sent: 2,
                failed: 1,
                fallbacks: 0
            }
        );
        assert_eq!(recv_all(&rx, 2).1, 2);
    }

    #[test]
    fn room_counts_both_message_slots_and_pieces() {
        let mut m = Mmsg::new(2, 3);
        let a = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9);
        assert!(m.has_room(3));
        assert!(!m.has_room(4), "more pieces than iovecs");
        m.queue_gather([(Buf::Main, 0, 1), (Buf::Aux, 0, 1)], a, 0);
        assert!(m.has_room(1));
        assert!(!m.has_room(2), "one iovec left");
        m.queue(0, 1, a);
        assert_eq!(m.queued(), 2);
        assert!(!m.has_room(0), "two messages fill the two message slots");
        m.clear();
        assert!(m.has_room(3));
    }
}
