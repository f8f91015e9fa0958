//! `subnet.env`: what the CNI plugin and Docker read. Format and semantics
//! as flannel's `WriteSubnetFile`; written atomically (temp file + rename).

use ipnetwork::Ipv4Network;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Network,
    /// The leased subnet (network address form, e.g. 10.5.34.0/24).
    pub subnet: Ipv4Network,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// The file's text. `FLANNEL_SUBNET` is the subnet's first host address
    /// with the subnet length, e.g. `10.5.34.1/24`.
    pub fn render(&self) -> String {
        let first = Ipv4Addr::from(u32::from(self.subnet.network()).wrapping_add(1));
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            first,
            self.subnet.prefix(),
            self.mtu,
            self.ipmasq
        )
    }

    /// Writes the file atomically with mode 0644, creating parent dirs.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        write_atomic(path, self.render().as_bytes())
    }
}

/// Writes `bytes` to `path` atomically (a temp file beside it, synced, then
/// renamed over it) with mode 0644, creating parent dirs: a reader sees the
/// old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, bytes, 0o644)
}

/// [`write_atomic`] with `mode`. The temp file has a fresh random name
/// (`.{name}.{pid}.{random}.tmp`) and is created exclusively, never through
/// a symlink: a name planted beside the file (or another writer's temp file,
/// or a CNI container ID ending in `.tmp`) is never followed, chmodded or
/// overwritten.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The umask may have narrowed the mode; set it exactly, on the fd.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The subnet recorded by a previous run (`FLANNEL_SUBNET`), converted back
/// to network form; `None` if the text has no valid one.
pub fn previous_subnet(text: &str) -> Option<Ipv4Network> {
    let value = text.lines().find_map(|l| {
        l.trim()
            .strip_prefix("FLANNEL_SUBNET=")
            .map(|v| v.trim().trim_matches('"'))
    })?;
    let net: Ipv4Network = value.parse().ok()?;
    Ipv4Network::new(net.network(), net.prefix()).ok()
}

/// Reads [`previous_subnet`] from a file; a missing or unreadable file is `None`.
pub fn read_previous_subnet(path: &Path) -> Option<Ipv4Network> {
    previous_subnet(&std::fs::read_to_string(path).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_never_follows_a_planted_symlink_and_sets_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("victim");
        std::fs::write(&target, b"keep").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Symlinks planted where an older, predictable temp name would be.
        let path = dir.join("subnet.env");
        std::os::unix::fs::symlink(
            &target,
            dir.join(format!(".subnet.env.{}.tmp", std::process::id())),
        )
        .unwrap();
        std::os::unix::fs::symlink(&target, dir.join("subnet.tmp")).unwrap();
        write_atomic_mode(&path, b"new", 0o640).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"keep",
            "the symlink was followed"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&target), 0o600, "the symlink's target was chmodded");
        assert_eq!(mode(&path), 0o640);
        write_atomic(&path, b"again").unwrap();
        assert_eq!(mode(&path), 0o644);
        // No temp file is left behind.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp") && !n.starts_with(".subnet.env.") && n != "subnet.tmp")
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn env() -> SubnetEnv {
        SubnetEnv {
            network: "10.5.0.0/16".parse().unwrap(),
            subnet: "10.5.34.0/24".parse().unwrap(),
            mtu: 1472,
            ipmasq: false,
        }
    }

    #[test]
    fn renders_flannel_format() {
        assert_eq!(
            env().render(),
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.34.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn previous_subnet_round_trips() {
        assert_eq!(previous_subnet(&env().render()), Some(env().subnet));
        assert_eq!(
            previous_subnet("FLANNEL_SUBNET=\"10.5.9.1/24\"\n"),
            Some("10.5.9.0/24".parse().unwrap())
        );
        assert_eq!(previous_subnet("FLANNEL_NETWORK=10.5.0.0/16\n"), None);
        assert_eq!(previous_subnet("FLANNEL_SUBNET=garbage\n"), None);
    }

    #[test]
    fn writes_atomically_with_parents() {
        let dir = std::env::temp_dir().join(format!("flannel-env-test-{}", std::process::id()));
        let path = dir.join("a/b/subnet.env");
        env().write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), env().render());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(read_previous_subnet(&path), Some(env().subnet));
        // No temp files left behind.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
