//! Atomic file writes: a reader sees the old file or the new one, never a
//! torn one, and a name planted beside the file is never followed.

use std::io::Write;
use std::path::Path;

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
}
