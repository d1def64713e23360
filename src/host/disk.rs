//! Watches the free space of the disk holding `data_dir`. The store needs
//! room for every send it records first; a full disk would stop the host's
//! work (nothing stored is lost, nothing is sent unrecorded), so the
//! operator hears of it while there is still room: one `DiskFull` alert
//! when free space falls below [`LOW`], one more only after it came back
//! above twice that and fell again.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::Host;
use crate::safety::alerts::{Alert, AlertKind};

/// Below this much free space the host alerts.
const LOW: u64 = 256 << 20;
/// How often the space is looked at.
const EVERY: Duration = Duration::from_secs(10);

/// Whether the disk is low, and so whether to alert again.
#[derive(Default)]
struct Watch {
    low: bool,
}

impl Watch {
    /// The alert's sentence if `free` bytes on the disk of `dir` is news.
    fn observe(&mut self, dir: &Path, free: u64) -> Option<String> {
        if self.low {
            self.low = free < 2 * LOW;
            return None;
        }
        if free >= LOW {
            return None;
        }
        self.low = true;
        Some(format!(
            "the disk holding data_dir ({}) has {} MB free: free space on it (old logs, other files) or move data_dir to a larger disk; when it is full the host stops sending until there is room, and loses nothing",
            dir.display(),
            free >> 20
        ))
    }
}

/// Bytes free for this user on the filesystem holding `dir`.
fn free_space(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid C string and `stats` a buffer statvfs fills.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `stats`.
    let stats = unsafe { stats.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ by platform
    Ok(stats.f_bavail as u64 * stats.f_frsize as u64)
}

/// Runs until the host stops.
pub(super) async fn watch(host: Arc<Host>) {
    let mut watch = Watch::default();
    loop {
        let dir = host.config().data_dir();
        if let Ok(free) = free_space(&dir) {
            if let Some(text) = watch.observe(&dir, free) {
                host.alerts
                    .raise(Alert::new(AlertKind::DiskFull, host.clock.now(), text));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = host.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_low_disk_is_told_once_until_space_comes_back() {
        let dir = Path::new("/srv/colloquy/data");
        let mut watch = Watch::default();
        assert_eq!(watch.observe(dir, 10 << 30), None);
        let told = watch.observe(dir, 100 << 20).expect("low space is told");
        assert_eq!(
            told,
            "the disk holding data_dir (/srv/colloquy/data) has 100 MB free: free space on it (old logs, other files) or move data_dir to a larger disk; when it is full the host stops sending until there is room, and loses nothing"
        );
        assert_eq!(watch.observe(dir, 0), None);
        assert_eq!(watch.observe(dir, 300 << 20), None, "not yet back");
        assert_eq!(watch.observe(dir, 100 << 20), None);
        assert_eq!(watch.observe(dir, 1 << 30), None);
        assert!(watch.observe(dir, 1 << 20).is_some(), "low again");
    }

    #[test]
    fn free_space_is_read_from_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_space(dir.path()).unwrap() > 0);
        assert!(free_space(&dir.path().join("missing")).is_err());
    }
}
