//! Test bed: hosts made of network namespaces on a bridge, a real etcd
//! (Debian's `etcd`) in a "hub" namespace, and our `flanneld` per host.
//! Everything is removed on drop, also when a test panics; names carry the
//! test process id and a counter, so tests run in parallel without clashing.
//! Traffic never leaves the namespaces the bed created.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const NS_PREFIX: &str = "ftest";
pub const HUB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 254);
pub const PREFIX: &str = "/coreos.com/network";
pub const DEFAULT_CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The daemon under test: this build's, or `FLANNELD_TEST_BIN` (to run a
/// test against another build, e.g. to show it fails without a fix).
pub fn flanneld_bin() -> PathBuf {
    std::env::var_os("FLANNELD_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_flanneld")))
}

/// A kernel counter of namespace `ns` as `nstat` names it (absolute
/// value; 0 when the kernel does not have it).
pub fn nstat(ns: &str, name: &str) -> u64 {
    sh(&["ip", "netns", "exec", ns, "nstat", "-az", name])
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` until it returns Some, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`: sockets it
/// creates live in that namespace.
pub fn in_ns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter_ns(&path);
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}

/// Like [`in_ns`], without waiting for the result.
pub fn spawn_in_ns<R: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> std::thread::JoinHandle<R> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter_ns(&path);
        f()
    })
}

fn enter_ns(path: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a valid namespace fd affects only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Deletes namespaces left by test processes that died without cleaning up.
fn reap_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

pub struct Host {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub subnet_file: PathBuf,
    log: PathBuf,
    daemon: Option<Child>,
}

/// How to run etcd: members (ports 2379, 22379, … on the hub address) and
/// optional TLS with client certificates.
#[derive(Clone, Default)]
pub struct EtcdSpec {
    pub members: usize,
    /// A directory with ca.pem, server.pem/key, client.pem/key (see [`make_certs`]).
    pub tls: Option<PathBuf>,
    /// Extra flags for etcdctl (e.g. --user).
    pub ctl_args: Vec<String>,
    /// Extra flags for every etcd member (e.g. --auth-token-ttl).
    pub etcd_args: Vec<String>,
}

/// One test's little world: a hub namespace with a bridge and etcd, and hosts.
pub struct Bed {
    pub name: String,
    pub hub: String,
    /// Comma-separated client URLs of all members.
    pub endpoint: String,
    pub dir: PathBuf,
    pub hosts: Vec<Host>,
    pub spec: EtcdSpec,
    etcd: Vec<Option<Child>>,
    namespaces: Vec<String>,
}

/// Makes a CA, an etcd server certificate for the hub address and a client
/// certificate (expired if `expired_client`) with openssl, into `dir`.
pub fn make_certs(dir: &Path, expired_client: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let ssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl (apt install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &d("ca.key"),
        "-out",
        &d("ca.pem"),
        "-days",
        "2",
        "-subj",
        "/CN=flannel-test-ca",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        format!(
            "subjectAltName=IP:{HUB_IP},IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, days) in [
        ("server", "2"),
        ("client", if expired_client { "-1" } else { "2" }),
    ] {
        ssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &d(&format!("{name}.key")),
            "-out",
            &d(&format!("{name}.csr")),
            "-subj",
            &format!("/CN={name}"),
        ]);
        ssl(&[
            "x509",
            "-req",
            "-in",
            &d(&format!("{name}.csr")),
            "-CA",
            &d("ca.pem"),
            "-CAkey",
            &d("ca.key"),
            "-set_serial",
            if name == "server" { "2" } else { "3" },
            "-days",
            days,
            "-extfile",
            &d(&format!("{name}.ext")),
            "-out",
            &d(&format!("{name}.pem")),
        ]);
    }
}

impl Bed {
    /// A bed with `n` hosts, etcd running and the default config written.
    pub fn new(n: usize) -> Bed {
        let mut bed = Bed::empty();
        bed.put(&format!("{PREFIX}/config"), DEFAULT_CONFIG);
        for _ in 0..n {
            bed.add_host();
        }
        bed
    }

    /// Hub and etcd only: no config, no hosts.
    pub fn empty() -> Bed {
        Bed::with_etcd(EtcdSpec {
            members: 1,
            ..EtcdSpec::default()
        })
    }

    /// Hub and the etcd described by `spec`: no config, no hosts.
    pub fn with_etcd(spec: EtcdSpec) -> Bed {
        reap_stale();
        let id = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{NS_PREFIX}{}x{id}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let hub = format!("{name}-hub");
        let scheme = if spec.tls.is_some() { "https" } else { "http" };
        let endpoint = (0..spec.members.max(1))
            .map(|m| format!("{scheme}://{HUB_IP}:{}", Bed::client_port(m)))
            .collect::<Vec<_>>()
            .join(",");
        let mut bed = Bed {
            endpoint,
            name,
            hub: hub.clone(),
            dir,
            hosts: Vec::new(),
            etcd: (0..spec.members.max(1)).map(|_| None).collect(),
            spec,
            namespaces: Vec::new(),
        };
        bed.add_ns(&hub);
        sh(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"]);
        sh(&[
            "ip",
            "-n",
            &hub,
            "addr",
            "add",
            &format!("{HUB_IP}/24"),
            "dev",
            "br0",
        ]);
        sh(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
        bed.start_etcd();
        bed
    }

    fn add_ns(&mut self, ns: &str) {
        sh(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    fn client_port(member: usize) -> u16 {
        2379 + 10000 * member as u16
    }

    /// Starts every etcd member and waits until the cluster answers.
    pub fn start_etcd(&mut self) {
        for m in 0..self.etcd.len() {
            self.start_member(m);
        }
        wait_for("etcd to be healthy", Duration::from_secs(30), || {
            self.etcdctl(&["endpoint", "health"])
                .status
                .success()
                .then_some(())
        });
    }

    /// Starts etcd member `m` (its data survives restarts).
    pub fn start_member(&mut self, m: usize) {
        assert!(self.etcd[m].is_none(), "etcd member {m} already running");
        let n = self.etcd.len();
        let peer = |i: usize| format!("http://127.0.0.1:{}", 2380 + 10000 * i);
        let cluster = (0..n)
            .map(|i| format!("m{i}={}", peer(i)))
            .collect::<Vec<_>>()
            .join(",");
        let client = self.endpoint.split(',').nth(m).unwrap().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("etcd-{m}.log")))
            .unwrap();
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.hub,
            "etcd",
            "--name",
            &format!("m{m}"),
        ])
        .arg("--data-dir")
        .arg(self.dir.join(format!("etcd-data-{m}")))
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer(m),
            "--initial-advertise-peer-urls",
            &peer(m),
        ])
        .args([
            "--initial-cluster",
            &cluster,
            "--initial-cluster-token",
            &self.name,
        ]);
        c.args(&self.spec.etcd_args);
        if let Some(t) = &self.spec.tls {
            c.arg("--cert-file").arg(t.join("server.pem"));
            c.arg("--key-file").arg(t.join("server.key"));
            c.arg("--trusted-ca-file").arg(t.join("ca.pem"));
            c.arg("--client-cert-auth");
        }
        let child = c
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting etcd (is etcd-server installed? run scripts/deps.sh)");
        self.etcd[m] = Some(child);
    }

    /// Kills etcd member `m` (SIGKILL) and reaps it.
    pub fn kill_member(&mut self, m: usize) {
        if let Some(mut c) = self.etcd[m].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop_etcd(&mut self) {
        for m in 0..self.etcd.len() {
            self.kill_member(m);
        }
    }

    /// etcdctl/flanneld flags for the TLS client certificate, if any.
    pub fn tls_flags(&self, style_flanneld: bool) -> Vec<String> {
        let Some(t) = &self.spec.tls else {
            return Vec::new();
        };
        let f = |n: &str| t.join(n).to_string_lossy().into_owned();
        if style_flanneld {
            vec![
                format!("--etcd-cafile={}", f("ca.pem")),
                format!("--etcd-certfile={}", f("client.pem")),
                format!("--etcd-keyfile={}", f("client.key")),
            ]
        } else {
            // etcdctl uses the server cert as its client cert (never expired).
            vec![
                format!("--cacert={}", f("ca.pem")),
                format!("--cert={}", f("server.pem")),
                format!("--key={}", f("server.key")),
            ]
        }
    }

    pub fn etcdctl(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.hub,
                "etcdctl",
                "--endpoints",
                &self.endpoint,
            ])
            .args(self.tls_flags(false))
            .args(&self.spec.ctl_args)
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("running etcdctl (is etcd-client installed?)")
    }

    fn etcdctl_ok(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn put(&self, key: &str, value: &str) {
        self.etcdctl_ok(&["put", key, value]);
    }

    pub fn del(&self, key: &str) {
        self.etcdctl_ok(&["del", key]);
    }

    /// Lease keys and values under the default prefix.
    pub fn leases(&self) -> Vec<(String, String)> {
        let out = self.etcdctl_ok(&["get", "--prefix", &format!("{PREFIX}/subnets/")]);
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].to_string(), c[1].to_string()))
            .collect()
    }

    /// Adds a host on the bridge (192.168.100.N), no daemon yet; returns its index.
    pub fn add_host(&mut self) -> usize {
        let i = self.hosts.len();
        let ns = format!("{}-h{i}", self.name);
        self.add_ns(&ns);
        let ip = Ipv4Addr::new(192, 168, 100, (i + 1) as u8);
        let veth = format!("v{i}");
        sh(&[
            "ip", "-n", &self.hub, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ]);
        sh(&[
            "ip", "-n", &self.hub, "link", "set", &veth, "master", "br0", "up",
        ]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &HUB_IP.to_string(),
        ]);
        self.hosts.push(Host {
            subnet_file: self.dir.join(format!("h{i}/subnet.env")),
            log: self.dir.join(format!("flanneld-h{i}.log")),
            ns,
            ip,
            daemon: None,
        });
        i
    }

    /// The flanneld command for host `i` (not started).
    pub fn flanneld_cmd(&self, i: usize, extra: &[&str]) -> Command {
        let h = &self.hosts[i];
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &h.ns])
            .arg(flanneld_bin())
            .arg(format!("--etcd-endpoints={}", self.endpoint))
            .args(self.tls_flags(true))
            .arg(format!("--subnet-file={}", h.subnet_file.display()))
            // Each host its own WireGuard key (they share one filesystem).
            .arg(format!(
                "--wireguard-key-file={}",
                h.subnet_file.with_file_name("wgkey").display()
            ))
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("FLANNEL_TEST_LOG").unwrap_or_else(|_| "info,flannel=debug".into()),
            );
        c
    }

    /// Starts flanneld on host `i` (output appended to its log).
    pub fn start(&mut self, i: usize, extra: &[&str]) {
        assert!(
            self.hosts[i].daemon.is_none(),
            "flanneld already running on h{i}"
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.hosts[i].log)
            .unwrap();
        let child = self
            .flanneld_cmd(i, extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting flanneld");
        self.hosts[i].daemon = Some(child);
    }

    /// Starts flanneld and waits until its subnet.env names a subnet.
    pub fn start_ready(&mut self, i: usize) -> ipnetwork::Ipv4Network {
        self.start_ready_with(i, &[])
    }

    /// [`Bed::start_ready`] with extra flags.
    pub fn start_ready_with(&mut self, i: usize, extra: &[&str]) -> ipnetwork::Ipv4Network {
        let _ = std::fs::remove_file(&self.hosts[i].subnet_file);
        self.start(i, extra);
        self.wait_subnet(i)
    }

    pub fn wait_subnet(&mut self, i: usize) -> ipnetwork::Ipv4Network {
        let file = self.hosts[i].subnet_file.clone();
        let sn = wait_for(
            &format!("subnet.env of h{i}"),
            Duration::from_secs(20),
            || {
                if let Some(st) = self.hosts[i]
                    .daemon
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    panic!("flanneld on h{i} exited with {st}:\n{}", self.log(i));
                }
                flannel::subnet_env::read_previous_subnet(&file)
            },
        );
        // subnet.env is written before the data path starts; wait for the TUN route too.
        let ns = self.hosts[i].ns.clone();
        wait_for("TUN route", Duration::from_secs(10), || {
            sh(&["ip", "-n", &ns, "route", "show"])
                .contains("flannel")
                .then_some(())
        });
        sn
    }

    /// Sends SIGTERM (or SIGKILL) and waits; returns the exit status.
    pub fn stop(&mut self, i: usize, signal: i32) -> Option<std::process::ExitStatus> {
        let mut c = self.hosts[i].daemon.take()?;
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(c.id() as i32, signal) };
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return Some(st);
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        self.hosts[i]
            .daemon
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log(&self, i: usize) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.hosts[i].log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The overlay address of host `i` (its TUN's /32, the subnet's network address).
    pub fn tun_addr(&self, i: usize) -> Ipv4Addr {
        flannel::subnet_env::read_previous_subnet(&self.hosts[i].subnet_file)
            .expect("host has a subnet")
            .network()
    }

    /// One ping from host `from` to `to`; true if answered.
    pub fn ping(&self, from: usize, to: Ipv4Addr) -> bool {
        self.ping_wait(from, to, "2")
    }

    /// One ping that waits `secs` (e.g. "0.2") for its answer.
    pub fn ping_wait(&self, from: usize, to: Ipv4Addr, secs: &str) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.hosts[from].ns,
                "ping",
                "-c",
                "1",
                "-W",
                secs,
                &to.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    pub fn ns(&self, i: usize) -> String {
        self.hosts[i].ns.clone()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        for i in 0..self.hosts.len() {
            if let Some(mut c) = self.hosts[i].daemon.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            if failing {
                eprintln!(
                    "----- flanneld log of h{i} ({}):\n{}",
                    self.hosts[i].ns,
                    self.log(i)
                );
            }
        }
        self.stop_etcd();
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deterministic pseudo-random bytes (xorshift), so corruption is visible.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `len` bytes over TCP from host `from` to host `to`'s overlay address
/// and returns what arrived.
pub fn tcp_transfer(bed: &Bed, from: usize, to: usize, data: Vec<u8>) -> Vec<u8> {
    tcp_between(&bed.ns(from), &bed.ns(to), bed.tun_addr(to), data)
}

/// Sends `data` over TCP from namespace `from_ns` to `dst` (an address of
/// namespace `to_ns`) and returns what arrived.
pub fn tcp_between(from_ns: &str, to_ns: &str, dst: Ipv4Addr, data: Vec<u8>) -> Vec<u8> {
    let (tx, rx) = std::sync::mpsc::channel();
    let server = spawn_in_ns(to_ns, move || {
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        tx.send(l.local_addr().unwrap().port()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let port = rx.recv().unwrap();
    in_ns(from_ns, move || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddrV4::new(dst, port).into(),
            Duration::from_secs(10),
        )
        .expect("TCP connect through the tunnel");
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    server.join().unwrap()
}

/// Sends one UDP datagram from host `from` to `dst:9` with IP_RECVERR and
/// returns the errno an ICMP error produced, if any.
pub fn udp_probe_error(bed: &Bed, from: usize, dst: Ipv4Addr) -> Option<i32> {
    udp_probe_error_ttl(bed, from, dst, 64)
}

pub fn udp_probe_error_ttl(bed: &Bed, from: usize, dst: Ipv4Addr, ttl: u32) -> Option<i32> {
    in_ns(&bed.ns(from), move || {
        use std::os::fd::AsRawFd;
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let one: libc::c_int = 1;
        // SAFETY: setting an int socket option on a valid socket.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_RECVERR,
                (&one as *const libc::c_int).cast(),
                4,
            );
        }
        s.set_ttl(ttl).unwrap();
        s.connect((dst, 9)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        for _ in 0..3 {
            let _ = s.send(b"probe");
            let mut b = [0u8; 64];
            match s.recv(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return e.raw_os_error(),
                Ok(_) => return None,
            }
        }
        None
    })
}

/// The etcd key of a subnet's lease under the default prefix.
pub fn key_of(sn: ipnetwork::Ipv4Network) -> String {
    format!("{PREFIX}/subnets/{}-{}", sn.network(), sn.prefix())
}

impl Bed {
    /// The etcd lease id attached to `key` (0: none, a reservation), or None if absent.
    pub fn lease_id(&self, key: &str) -> Option<i64> {
        let out = self.etcdctl_ok(&["get", key, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        let kv = v.get("kvs")?.get(0)?;
        Some(kv.get("lease").and_then(|l| l.as_i64()).unwrap_or(0))
    }

    /// The current store revision.
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl_ok(&["get", "/", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        v["header"]["revision"].as_i64().expect("revision")
    }

    /// The etcd server's pid (`ip netns exec` execs it, so the child is etcd).
    /// Compacts etcd's history up to now (after `extra` unrelated writes,
    /// so the compacted revision is past anything a watch saw).
    pub fn compact_now(&self, extra: usize) {
        for i in 0..extra {
            self.put(&format!("{PREFIX}/unrelated/{i}"), "x");
        }
        let rev = self.revision();
        assert!(self
            .etcdctl(&["compaction", &rev.to_string()])
            .status
            .success());
    }

    pub fn etcd_pid(&self) -> i32 {
        self.etcd[0].as_ref().expect("etcd running").id() as i32
    }

    /// Sends a signal to host `i`'s daemon without waiting.
    pub fn signal(&self, i: usize, sig: i32) {
        let c = self.hosts[i].daemon.as_ref().expect("daemon running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, sig) };
    }
}

/// Runs `f` with an etcd client connected from inside the hub namespace.
pub fn with_etcd_client<R: Send + 'static>(
    bed: &Bed,
    f: impl FnOnce(
            etcd_client::Client,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = R> + Send>>
        + Send
        + 'static,
) -> R {
    let ep = bed.endpoint.split(',').next().unwrap().to_string();
    in_ns(&bed.hub, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let c = etcd_client::Client::connect([ep], None)
                .await
                .expect("etcd client");
            f(c).await
        })
    })
}

/// Writes `n` /24 leases out of 10.0.0.0/8 (from 10.0.1.0), PublicIP from
/// `ip_of(i)`, in transactions of 100 puts.
pub fn bulk_leases(bed: &Bed, n: usize, ip_of: fn(usize) -> Ipv4Addr) {
    with_etcd_client(bed, move |mut c| {
        Box::pin(async move {
            let mut i = 0;
            while i < n {
                let ops: Vec<etcd_client::TxnOp> = (i..(i + 100).min(n))
                    .map(|k| {
                        let net = Ipv4Addr::from(0x0a00_0000u32 + ((k as u32 + 1) << 8));
                        etcd_client::TxnOp::put(
                            format!("{PREFIX}/subnets/{net}-24"),
                            format!(r#"{{"PublicIP":"{}","PublicIPv6":null}}"#, ip_of(k)),
                            None,
                        )
                    })
                    .collect();
                c.txn(etcd_client::Txn::new().and_then(ops))
                    .await
                    .expect("bulk txn");
                i += 100;
            }
        })
    })
}

/// Peak resident memory (VmHWM) of a process, in MB.
pub fn peak_rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

impl Bed {
    /// A namespace owned (and removed) by this bed, e.g. a pod.
    pub fn add_ns_named(&mut self, suffix: &str) -> String {
        let ns = format!("{}-{suffix}", self.name);
        self.add_ns(&ns);
        ns
    }

    pub fn daemon_pid(&self, i: usize) -> u32 {
        self.hosts[i].daemon.as_ref().expect("daemon running").id()
    }
}

/// `GET path` on 127.0.0.1:`port` inside namespace `ns`: (status, body).
pub fn http_get(ns: &str, port: u16, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into(),
            Duration::from_secs(2),
        )
        .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n")?.1.to_string();
        Some((status, body))
    })
}

/// The value of one sample (`name{labels}` exactly as rendered) in a scrape.
pub fn metric(scrape: &str, sample: &str) -> u64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{scrape}")) as u64
}

pub const CNI_BIN: &str = "/usr/lib/cni";

pub fn plugin_dir() -> String {
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_flannel"));
    format!("{}:{CNI_BIN}", ours.parent().unwrap().display())
}

/// Runs CNI plugin `ty` in host `host_ns` like a runtime: env + stdin.
pub fn cni(
    host_ns: &str,
    ty: &str,
    command: &str,
    id: &str,
    pod_ns: &str,
    conf: &serde_json::Value,
) -> (bool, serde_json::Value) {
    use std::io::Write as _;
    let bin = plugin_dir()
        .split(':')
        .map(|d| PathBuf::from(d).join(ty))
        .find(|p| p.is_file())
        .expect("plugin binary");
    let mut child = Command::new("ip")
        .args(["netns", "exec", host_ns])
        .arg(&bin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", format!("/run/netns/{pod_ns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", plugin_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    if !out.status.success() {
        eprintln!(
            "{ty} {command} failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (out.status.success(), v)
}

pub fn net_conf(bed: &Bed, i: usize) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
        "subnetFile": bed.hosts[i].subnet_file,
        "dataDir": bed.dir.join(format!("h{i}/cni")),
        "ipam": {"dataDir": bed.dir.join(format!("h{i}/ipam"))},
    })
}

pub fn pod_ip(result: &serde_json::Value) -> Ipv4Addr {
    let a = result["ips"][0]["address"]
        .as_str()
        .expect("an IP in the result");
    a.split('/').next().unwrap().parse().unwrap()
}

/// Waits until a flanneld started outside the bed (`child`) has written a
/// subnet to `file`; panics with its log if it exits first.
pub fn wait_child_lease(
    what: &str,
    child: &mut Child,
    file: &Path,
    log: &Path,
) -> ipnetwork::Ipv4Network {
    wait_for(what, Duration::from_secs(20), || {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "flanneld exited {st}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        flannel::subnet_env::read_previous_subnet(file)
    })
}

/// SIGTERM to a flanneld started outside the bed; true if it exited cleanly.
pub fn term_child(child: &mut Child) -> bool {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap().success()
}

/// Serialises the tests of one test binary that load both cores (floods,
/// 256 MB transfers, twenty daemons): run side by side on a 2-core machine
/// they starve each other's daemons and turn into timing tests. Test
/// binaries already run one after another; hold the guard for the test.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

impl Bed {
    /// Host `i`'s daemon's exit status, once it has exited on its own.
    pub fn exit_status(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.hosts[i].daemon.as_mut()?.try_wait().ok().flatten()
    }
}

/// Two hosts, each running flanneld with `args`, h0 already reaching h1
/// through the tunnel.
pub fn two_hosts(args: &[&str]) -> Bed {
    let mut bed = Bed::new(2);
    bed.start_ready_with(0, args);
    bed.start_ready_with(1, args);
    let dst = bed.tun_addr(1);
    wait_for("h0 -> h1", Duration::from_secs(10), || {
        bed.ping(0, dst).then_some(())
    });
    bed
}

/// Spawns a flanneld command built outside the bed with its output in
/// `log`, and waits until it has written a subnet to `subnet_file`.
pub fn spawn_until_lease(
    cmd: &mut Command,
    log: &Path,
    subnet_file: &Path,
    what: &str,
) -> (Child, ipnetwork::Ipv4Network) {
    let mut child = cmd
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let sn = wait_child_lease(what, &mut child, subnet_file, log);
    (child, sn)
}
impl Bed {
    /// Host `i`'s daemon ignored the lease `sn` (a key suffix such as
    /// `10.5.201.0-24`): its `log` says so, and the subnet is unroutable.
    pub fn assert_lease_ignored(&self, i: usize, log: &str, sn: &str) {
        assert!(
            log.contains(&format!("ignoring lease {PREFIX}/subnets/{sn}")),
            "{sn}:\n{log}"
        );
        let dst: Ipv4Addr = sn.replace("0-24", "9").parse().unwrap();
        assert_eq!(
            udp_probe_error(self, i, dst),
            Some(libc::ENETUNREACH),
            "{dst} is routed"
        );
    }

    /// Host `i`'s lease value in etcd, checked to be of `backend` and to
    /// carry the host's address.
    pub fn own_lease(&self, i: usize, backend: &str) -> serde_json::Value {
        let key =
            key_of(flannel::subnet_env::read_previous_subnet(&self.hosts[i].subnet_file).unwrap());
        let (_, v) = self
            .leases()
            .into_iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("no lease {key}"));
        let v: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert_eq!(v["BackendType"], backend, "{v}");
        assert_eq!(v["PublicIP"], self.hosts[i].ip.to_string(), "{v}");
        v
    }
}

/// A bed with `n` hosts (no daemon yet) and `config` written.
pub fn bed_with(config: &str, n: usize) -> Bed {
    let mut bed = Bed::empty();
    bed.put(&format!("{PREFIX}/config"), config);
    for _ in 0..n {
        bed.add_host();
    }
    bed
}

/// `ping <args> dst` in namespace `ns`; true if answered.
pub fn ping_with(ns: &str, args: &[&str], dst: Ipv4Addr) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "ping"])
        .args(args)
        .arg(dst.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// A ping of `size` payload bytes with DF set; true if answered.
pub fn ping_df(ns: &str, dst: Ipv4Addr, size: usize) -> bool {
    let size = size.to_string();
    ping_with(ns, &["-c", "2", "-W", "2", "-M", "do", "-s", &size], dst)
}

/// `data` sent over TCP from host `from` to `dst` (an address of host
/// `to`) arrives whole and unchanged.
pub fn assert_tcp_intact(bed: &Bed, from: usize, to: usize, dst: Ipv4Addr, data: &[u8]) {
    let got = tcp_between(&bed.ns(from), &bed.ns(to), dst, data.to_vec());
    assert!(
        got == data,
        "TCP h{from} -> h{to}: {} of {} bytes, or corrupted",
        got.len(),
        data.len()
    );
}

/// The metrics of host `i`'s daemon on `--healthz-port=port`.
pub fn scrape(bed: &Bed, i: usize, port: u16) -> String {
    wait_for("metrics", Duration::from_secs(5), || {
        http_get(&bed.ns(i), port, "/metrics")
    })
    .1
}

pub mod kernel_vxlan;
pub mod wg_node;
