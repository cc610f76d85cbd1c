//! One writer per store: an exclusive OS file lock on `<store>/.lock`. The OS releases it
//! when the holder dies (even by kill -9), so a dead run never blocks the store for good.
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::error::{EngineError, Result};

pub struct StoreLock {
    file: File,
    /// A store on object storage also holds its lease in the bucket (see `lease.rs`).
    pub(super) lease: Option<super::lease::Lease>,
}

/// What the lock file says about its holder, written when the lock is taken: pid, host,
/// command line (shortened) and since when.
pub(super) fn holder_text() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut cmd = std::env::args()
        .map(|a| {
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    if cmd.chars().count() > 200 {
        cmd = cmd.chars().take(200).collect::<String>() + "…";
    }
    // One line: the waiting run prints it inside a message.
    let cmd = cmd.replace(['\n', '\r'], " ");
    format!(
        "pid {}{}, `{cmd}`, since {}",
        std::process::id(),
        if host.is_empty() {
            String::new()
        } else {
            format!(" on {host}")
        },
        chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
    )
}

impl StoreLock {
    /// Takes the lock, waiting for another run to finish. `on_wait` is told who holds it
    /// (never empty), once, before waiting.
    pub fn acquire(store: &Path, wait: bool, on_wait: impl Fn(&str)) -> Result<StoreLock> {
        let path = store.join(".lock");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| EngineError::io(format!("opening {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // At most a line's worth: the file is the store's, but anyone may write it.
                let _ = (&mut file).take(1024).read_to_string(&mut holder);
                let holder = holder.lines().next().unwrap_or("").trim().to_string();
                let holder = if holder.is_empty() {
                    // Taken a moment ago, its holder not yet written; or a flag that did not
                    // record itself.
                    "holder unknown: the lock file names no process".to_string()
                } else {
                    holder
                };
                if !wait {
                    return Err(EngineError::Store {
                        path: path.clone(),
                        message: format!(
                            "locked by another flag run ({holder}); retry when it ends"
                        ),
                    });
                }
                on_wait(&holder);
                file.lock()
                    .map_err(|e| EngineError::io(format!("locking {}", path.display()), e))?;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(EngineError::io(format!("locking {}", path.display()), e));
            }
        }
        // Who holds it, for the message a waiting run prints.
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = write!(file, "{}", holder_text());
        let _ = file.flush();
        Ok(StoreLock { file, lease: None })
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        // The bucket's lease first: the local lock is what another run here waits on.
        drop(self.lease.take());
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}
