//! The TUN device: `/dev/net/tun` opened with `IFF_TUN | IFF_NO_PI`, named
//! from a pattern like flannel's `flannel%d`. Our own small ioctl wrapper:
//! the `tun-tap` crate cannot set the flags the fast path needs
//! (`IFF_VNET_HDR`, `IFF_MULTI_QUEUE`) and pulls in tokio-core 0.1.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

pub struct Tun {
    fd: OwnedFd,
    name: String,
    vnet_hdr: bool,
}

/// How to open the TUN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunFlags {
    /// `IFF_VNET_HDR`: every packet carries a `virtio_net_hdr` (offloads).
    pub vnet_hdr: bool,
    /// `IFF_MULTI_QUEUE`: more queues can be attached with [`Tun::attach`].
    pub multi_queue: bool,
}

/// The offloads a TUN queue was given: TCP segmentation (with checksum
/// offload), and UDP segmentation on kernels that have it (6.2+).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    pub tso: bool,
    pub uso: bool,
}

impl Offloads {
    fn flags(self) -> libc::c_uint {
        let mut f = 0;
        if self.tso {
            f |= libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        }
        if self.uso {
            f |= libc::TUN_F_USO4 | libc::TUN_F_USO6;
        }
        f
    }
}

impl Tun {
    /// Whether the device `pattern` names can have several queues: a
    /// pre-created single-queue device (a fixed name, no %d) refuses
    /// `IFF_MULTI_QUEUE` (EINVAL), and then one queue is used.
    pub fn takes_multi_queue(pattern: &str) -> bool {
        if pattern.contains('%') {
            return true;
        }
        let probe = TunFlags {
            vnet_hdr: false,
            multi_queue: true,
        };
        match Tun::create(pattern, probe) {
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                tracing::warn!("{pattern} is a single-queue TUN: using one worker");
                false
            }
            _ => true, // the probe closes again (or the error repeats when opening)
        }
    }

    /// Opens the first queue, with `IFF_VNET_HDR` and the most offloads the
    /// kernel grants when `offload` is asked for (TSO + USO, else TSO),
    /// else (or when the kernel grants none) a plain device.
    pub fn open_offloaded(
        pattern: &str,
        multi_queue: bool,
        offload: bool,
    ) -> io::Result<(Tun, Offloads)> {
        if offload {
            let t = Tun::create(
                pattern,
                TunFlags {
                    vnet_hdr: true,
                    multi_queue,
                },
            )?;
            for o in [
                Offloads {
                    tso: true,
                    uso: true,
                },
                Offloads {
                    tso: true,
                    uso: false,
                },
            ] {
                if t.set_offloads(o).is_ok() {
                    return Ok((t, o));
                }
            }
            // Dropped: the device goes away and is made again plain.
        }
        let t = Tun::create(
            pattern,
            TunFlags {
                vnet_hdr: false,
                multi_queue,
            },
        )?;
        Ok((t, Offloads::default()))
    }

    /// Gives this queue `o` (a queue attached later needs the same as the first).
    pub fn set_offloads(&self, o: Offloads) -> io::Result<()> {
        if o == Offloads::default() {
            return Ok(());
        }
        self.set_offload(o.flags())
    }

    /// Creates a TUN device; `%d` in `pattern` lets the kernel pick the
    /// first free number (`flannel%d` → `flannel0`, `flannel1`, …).
    /// The fd is non-blocking; the device vanishes when it is closed.
    pub fn create(pattern: &str, flags: TunFlags) -> io::Result<Tun> {
        let path = c"/dev/net/tun";
        // SAFETY: path is NUL-terminated; the fd is owned right below.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::ENOENT) => "/dev/net/tun does not exist: give the container the device (--device /dev/net/tun) or load the tun module",
                Some(libc::EACCES) | Some(libc::EPERM) => "no permission to open /dev/net/tun: flanneld needs CAP_NET_ADMIN and access to the device",
                _ => "cannot open /dev/net/tun",
            };
            return Err(io::Error::new(e.kind(), format!("{hint} ({e})")));
        }
        // SAFETY: fd is fresh and valid.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ifreq is plain data; zeroed is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        let b = pattern.as_bytes();
        if b.is_empty() || b.len() >= ifr.ifr_name.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad TUN name {pattern:?}"),
            ));
        }
        for (d, s) in ifr.ifr_name.iter_mut().zip(b) {
            *d = *s as libc::c_char;
        }
        let mut f = libc::IFF_TUN | libc::IFF_NO_PI;
        if flags.vnet_hdr {
            f |= libc::IFF_VNET_HDR;
        }
        if flags.multi_queue {
            f |= libc::IFF_MULTI_QUEUE;
        }
        ifr.ifr_ifru.ifru_flags = f as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes the ifreq we own.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut ifr) } < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("TUNSETIFF {pattern}: {e}"),
            ));
        }
        // SAFETY: the kernel wrote a NUL-terminated name into ifr_name.
        let name = unsafe { std::ffi::CStr::from_ptr(ifr.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok(Tun {
            fd,
            name,
            vnet_hdr: flags.vnet_hdr,
        })
    }

    /// Opens another queue of this multi-queue TUN.
    pub fn attach(&self) -> io::Result<Tun> {
        Tun::create(
            &self.name,
            TunFlags {
                vnet_hdr: self.vnet_hdr,
                multi_queue: true,
            },
        )
    }

    /// `TUNSETOFFLOAD`: which offloads the kernel may hand us (TUN_F_*).
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Writes one packet gathered from `head` and up to 64 `pieces`.
    pub fn write_gather<'a>(
        &self,
        head: &[u8],
        pieces: impl Iterator<Item = &'a [u8]>,
    ) -> io::Result<usize> {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iov = [empty; 65];
        iov[0] = libc::iovec {
            iov_base: head.as_ptr() as *mut _,
            iov_len: head.len(),
        };
        let mut n = 1;
        for p in pieces {
            if n == iov.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "too many pieces",
                ));
            }
            iov[n] = libc::iovec {
                iov_base: p.as_ptr() as *mut _,
                iov_len: p.len(),
            };
            n += 1;
        }
        // SAFETY: iov[..n] describe live, readable buffers borrowed for this call.
        let r = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// Writes one packet from two pieces (a vnet header and the packet).
    #[inline]
    pub fn write2(&self, a: &[u8], b: &[u8]) -> io::Result<usize> {
        let iov = [
            libc::iovec {
                iov_base: a.as_ptr() as *mut _,
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            },
        ];
        // SAFETY: both iovecs describe live, readable buffers.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet; `WouldBlock` when none is queued.
    #[inline]
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is writable for buf.len() bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one packet.
    #[inline]
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is readable for buf.len() bytes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
