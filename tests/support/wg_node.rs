//! A Go-flanneld-like wireguard node, for testing our wireguard backend
//! against the real thing: Debian's `wireguard-go` runs `flannel-wg` in the
//! host's namespace (MTU iface − 80, the subnet's .0 with the Network's
//! prefix, as flannel configures it), its lease carries flannel's
//! `{"PublicKey", "Port"}`, and each peer lease is programmed with
//! `wg set` exactly as flannel's backend does: endpoint PublicIP:Port,
//! AllowedIPs the peer's subnet, the PSK and the keepalive.

use super::{key_of, sh, Bed, PREFIX};
use ipnetwork::Ipv4Network;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const DEV: &str = "flannel-wg";

pub struct WgNode {
    pub host: usize,
    pub subnet: Ipv4Network,
    pub port: u16,
    pub public: String,
    key_file: PathBuf,
    /// The PSK file given to every peer, if any.
    psk_file: Option<PathBuf>,
    keepalive: u16,
    child: Child,
    ns: String,
    programmed: Vec<String>,
}

fn wg_out(args: &[&str], stdin: Option<&str>) -> String {
    let mut c = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wg (wireguard-tools) is installed");
    if let Some(s) = stdin {
        c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "wg {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

impl WgNode {
    /// Makes host `host` of `bed` a wireguard-go node holding `subnet`,
    /// listening on `port`, with `psk` (base64) for every peer.
    pub fn new(
        bed: &Bed,
        host: usize,
        subnet: &str,
        port: u16,
        psk: Option<&str>,
        keepalive: u16,
    ) -> WgNode {
        let ns = bed.ns(host);
        let subnet: Ipv4Network = subnet.parse().unwrap();
        let key_file = bed.dir.join(format!("ref-h{host}.key"));
        let psk_file = psk.map(|p| {
            let f = bed.dir.join(format!("ref-h{host}.psk"));
            std::fs::write(&f, p).unwrap();
            f
        });
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "wireguard-go", "-f", DEV])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wireguard-go is installed");
        super::wait_for("wireguard-go's device", Duration::from_secs(10), || {
            Command::new("wg")
                .args(["show", DEV])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()?
                .success()
                .then_some(())
        });
        let mut node = WgNode {
            host,
            subnet,
            port,
            public: String::new(),
            key_file,
            psk_file,
            keepalive,
            child,
            ns: ns.clone(),
            programmed: Vec::new(),
        };
        node.new_key(bed);
        let addr = format!("{}/16", subnet.network());
        sh(&["ip", "-n", &ns, "addr", "add", &addr, "dev", DEV]);
        sh(&["ip", "-n", &ns, "link", "set", DEV, "mtu", "1420", "up"]);
        node
    }

    /// A fresh private key (as after flannel's key file was lost), and the
    /// lease that says so.
    pub fn new_key(&mut self, bed: &Bed) {
        let private = wg_out(&["genkey"], None);
        std::fs::write(&self.key_file, &private).unwrap();
        self.public = wg_out(&["pubkey"], Some(&private));
        let port = self.port.to_string();
        wg_out(
            &[
                "set",
                DEV,
                "private-key",
                self.key_file.to_str().unwrap(),
                "listen-port",
                &port,
            ],
            None,
        );
        bed.put(
            &key_of(self.subnet),
            &self.lease_value(bed.hosts[self.host].ip),
        );
    }

    pub fn lease_value(&self, ip: Ipv4Addr) -> String {
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{}","Port":{}}}}}"#,
            self.public, self.port
        )
    }

    /// Sets the PSK used for peers programmed from now on.
    pub fn set_psk(&mut self, bed: &Bed, psk: &str) {
        let f = bed.dir.join(format!("ref-h{}.psk", self.host));
        std::fs::write(&f, psk).unwrap();
        self.psk_file = Some(f);
        self.programmed.clear();
    }

    /// Programs every other wireguard lease as a peer, as flannel's
    /// handleSubnetEvents does, and removes peers whose lease is gone.
    pub fn sync(&mut self, bed: &Bed) {
        let mut want = Vec::new();
        for (key, value) in bed.leases() {
            let Some(sfx) = key.strip_prefix(&format!("{PREFIX}/subnets/")) else {
                continue;
            };
            let sn: Ipv4Network = sfx.replacen('-', "/", 1).parse().unwrap();
            let v: serde_json::Value = serde_json::from_str(&value).unwrap();
            if sn == self.subnet || v["BackendType"] != "wireguard" {
                continue;
            }
            let Some(pk) = v["BackendData"]["PublicKey"].as_str() else {
                continue;
            };
            let port = v["BackendData"]["Port"]
                .as_u64()
                .filter(|&p| p > 0)
                .unwrap_or(self.port as u64);
            let ip = v["PublicIP"].as_str().unwrap();
            let mut args: Vec<String> = ["set", DEV, "peer", pk, "endpoint"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.push(format!("{ip}:{port}"));
            args.extend(["allowed-ips".into(), sn.to_string()]);
            args.extend(["persistent-keepalive".into(), self.keepalive.to_string()]);
            if let Some(f) = &self.psk_file {
                args.extend(["preshared-key".into(), f.display().to_string()]);
            }
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            wg_out(&a, None);
            want.push(pk.to_string());
        }
        for old in std::mem::take(&mut self.programmed) {
            if !want.contains(&old) {
                wg_out(&["set", DEV, "peer", &old, "remove"], None);
            }
        }
        self.programmed = want;
    }

    /// `wg show flannel-wg transfer`: (received, sent) bytes from the peer `key`.
    pub fn transfer(&self, key: &str) -> (u64, u64) {
        let out = wg_out(&["show", DEV, "transfer"], None);
        out.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&key)).then(|| (f[1].parse().unwrap(), f[2].parse().unwrap()))
            })
            .unwrap_or((0, 0))
    }

    pub fn ns(&self) -> &str {
        &self.ns
    }
}

impl Drop for WgNode {
    fn drop(&mut self) {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        // ip netns exec forwards nothing: make sure wireguard-go is gone.
        let _ = Command::new("pkill")
            .args(["-f", &format!("wireguard-go -f {DEV}")])
            .status();
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{DEV}.sock"));
    }
}
