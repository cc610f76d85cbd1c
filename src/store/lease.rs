//! The lock of a store on object storage: a lease object `lock` in the bucket, since a file
//! lock does not reach other machines.
//!
//! The lease is a small JSON object: who holds it (the same text the file lock records), a
//! random token, and until when (Unix ms, the holder's clock). It is taken with a conditional
//! create, or by a conditional swap of an expired or released lease (exactly one of several
//! racing coordinators wins either). The holder renews it every third of its term; a holder
//! killed with -9 stops renewing, and the next coordinator takes the lease over once it has
//! expired (`FLAG_S3_LEASE_SECS`, default 30 s). A holder that fails to renew in time (a stalled
//! machine whose lease another coordinator then took) notices on its next commit
//! (`ensure_held`) and fails instead of writing under someone else's lease.
//!
//! Clocks: expiry compares the reader's clock with the holder's; machines are assumed to agree
//! within a few seconds (NTP), which the default term leaves room for.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::UpdateVersion;
use serde::{Deserialize, Serialize};

use super::remote::Remote;
use crate::error::{EngineError, Result};

/// The lease object, relative to the store's prefix.
pub const LEASE: &str = "lock";

#[derive(Serialize, Deserialize, Debug)]
struct LeaseBody {
    holder: String,
    token: String,
    /// Unix ms after which anyone may take it over; 0 once released.
    expires_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn term() -> Duration {
    let secs = std::env::var("FLAG_S3_LEASE_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s >= 1)
        .unwrap_or(30);
    Duration::from_secs(secs)
}

struct Shared {
    /// The version of the lease object this holder last wrote.
    version: Mutex<Option<UpdateVersion>>,
    lost: AtomicBool,
    /// Until when (Unix ms) the last successful renewal holds it.
    expires_ms: Mutex<u64>,
    /// A commit needs at least this much of the lease left: a write checked just before the
    /// lease ran out could land after another coordinator took it.
    margin_ms: u64,
    stop: (Mutex<bool>, Condvar),
}

pub struct Lease {
    held: LeaseCheck,
    renewer: Option<std::thread::JoinHandle<()>>,
}

fn body(holder: &str, token: &str, expires_ms: u64) -> Vec<u8> {
    serde_json::to_vec(&LeaseBody {
        holder: holder.to_string(),
        token: token.to_string(),
        expires_ms,
    })
    .expect("lease serialises")
}

fn random_token() -> String {
    let mut seed = Vec::new();
    seed.extend_from_slice(&now_ms().to_le_bytes());
    seed.extend_from_slice(&std::process::id().to_le_bytes());
    seed.extend_from_slice(&std::fs::read("/proc/sys/kernel/random/uuid").unwrap_or_default());
    blake3::hash(&seed).to_hex()[..32].to_string()
}

impl Lease {
    /// Takes the lease, waiting while another coordinator holds it (unless `!wait`); `on_wait`
    /// is told who, once.
    pub fn acquire(
        remote: Arc<Remote>,
        holder: String,
        wait: bool,
        on_wait: impl Fn(&str),
    ) -> Result<Lease> {
        let token = random_token();
        let term = term();
        let mut told = false;
        loop {
            let expires = now_ms() + term.as_millis() as u64;
            let mine = body(&holder, &token, expires);
            let current = remote.get_small(LEASE)?;
            let taken = match &current {
                None => remote.swap(LEASE, mine, None)?.map(|v| (v, expires)),
                Some(f) => {
                    let other: Option<LeaseBody> = serde_json::from_slice(&f.bytes).ok();
                    match other {
                        // Our own write, whose answer was lost (a retried create that then
                        // found it "exists"): it is ours.
                        Some(o) if o.token == token => Some((f.version.clone(), o.expires_ms)),
                        // Held and not expired: wait.
                        Some(o) if o.expires_ms > now_ms() => {
                            if !wait {
                                return Err(EngineError::Remote {
                                    url: remote.url_of(LEASE),
                                    message: format!(
                                        "locked by another flag run ({}; its lease runs \
                                         {} s more); retry when it ends",
                                        o.holder,
                                        o.expires_ms.saturating_sub(now_ms()).div_ceil(1000)
                                    ),
                                });
                            }
                            if !told {
                                on_wait(&format!(
                                    "{}; lease {} s",
                                    o.holder,
                                    o.expires_ms.saturating_sub(now_ms()).div_ceil(1000)
                                ));
                                told = true;
                            }
                            std::thread::sleep(Duration::from_millis(250));
                            continue;
                        }
                        // Expired, released, or not a lease at all (a damaged object would
                        // otherwise lock the store for good): take it over, if still so.
                        _ => remote
                            .swap(LEASE, mine, Some(f.version.clone()))?
                            .map(|v| (v, expires)),
                    }
                }
            };
            if let Some((version, expires)) = taken {
                let shared = Arc::new(Shared {
                    version: Mutex::new(Some(version)),
                    lost: AtomicBool::new(false),
                    expires_ms: Mutex::new(expires),
                    margin_ms: (term.as_millis() as u64 / 4).max(500),
                    stop: (Mutex::new(false), Condvar::new()),
                });
                let renewer = {
                    let (remote, holder, token, shared) = (
                        remote.clone(),
                        holder.clone(),
                        token.clone(),
                        shared.clone(),
                    );
                    std::thread::Builder::new()
                        .name("flag-lease".into())
                        .spawn(move || renew_loop(&remote, &holder, &token, &shared, term))
                        .map_err(|e| EngineError::io("starting the lease renewal thread", e))?
                };
                return Ok(Lease {
                    held: LeaseCheck {
                        url: remote.url_of(LEASE),
                        shared,
                        remote,
                        holder,
                        token,
                    },
                    renewer: Some(renewer),
                });
            }
            // Another coordinator won the race for it: read again.
        }
    }

    /// A handle the store checks before each commit to the bucket.
    pub fn check(&self) -> LeaseCheck {
        self.held.clone()
    }
}

/// Whether a lease is still held (see `Lease::check`).
#[derive(Clone)]
pub struct LeaseCheck {
    shared: Arc<Shared>,
    url: String,
    remote: Arc<Remote>,
    holder: String,
    token: String,
}

impl LeaseCheck {
    /// Gives the lease back now (Ctrl-C: the process exits without unwinding, and the store
    /// must not stay blocked for the rest of the term). Nothing is committed after this.
    pub fn release(&self) {
        release(&self.remote, &self.holder, &self.token, &self.shared);
    }

    /// Fails unless this coordinator still holds the lease: called before each commit to the
    /// bucket, so a holder whose lease lapsed never writes over another's work.
    pub fn ensure_held(&self) -> Result<()> {
        let lapsed = *self.shared.expires_ms.lock().unwrap() <= now_ms() + self.shared.margin_ms;
        if self.shared.lost.load(Ordering::SeqCst) || lapsed {
            return Err(EngineError::Remote {
                url: self.url.clone(),
                message: format!(
                    "this run lost the store's lease ({}): it was not renewed in time and \
                     another coordinator may have taken it; nothing more is committed",
                    if lapsed {
                        "it expired"
                    } else {
                        "it was taken over"
                    }
                ),
            });
        }
        Ok(())
    }
}

fn renew_loop(remote: &Remote, holder: &str, token: &str, shared: &Shared, term: Duration) {
    let every = term / 3;
    loop {
        {
            let (lock, cv) = &shared.stop;
            let guard = lock.lock().unwrap();
            // `_while`: a stop set before this wait begins is not missed.
            let (guard, _) = cv.wait_timeout_while(guard, every, |stop| !*stop).unwrap();
            if *guard {
                return;
            }
        }
        let expires = now_ms() + term.as_millis() as u64;
        // Held across the swap: a release (Ctrl-C) must not swap with a version this renewal
        // is replacing.
        let mut version = shared.version.lock().unwrap();
        if shared.lost.load(Ordering::SeqCst) {
            return; // released meanwhile
        }
        match remote.swap(LEASE, body(holder, token, expires), version.clone()) {
            Ok(Some(v)) => {
                *version = Some(v);
                *shared.expires_ms.lock().unwrap() = expires;
            }
            // Someone swapped it, or our own earlier write landed though its answer was
            // lost (object_store retries): read it to know which.
            Ok(None) => match remote.get_small(LEASE) {
                Ok(Some(f))
                    if serde_json::from_slice::<LeaseBody>(&f.bytes)
                        .is_ok_and(|b| b.token == token && b.expires_ms > now_ms()) =>
                {
                    let b: LeaseBody = serde_json::from_slice(&f.bytes).expect("parsed above");
                    *version = Some(f.version);
                    *shared.expires_ms.lock().unwrap() = b.expires_ms;
                }
                Ok(_) => {
                    shared.lost.store(true, Ordering::SeqCst);
                    return;
                }
                Err(_) => {}
            },
            // A network error: try again next time; `ensure_held` fails once it lapses.
            Err(_) => {}
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let (lock, cv) = &self.held.shared.stop;
            *lock.lock().unwrap() = true;
            cv.notify_all();
        }
        if let Some(h) = self.renewer.take() {
            let _ = h.join();
        }
        self.held.release();
    }
}

/// Released, not deleted: a conditional swap cannot release someone else's lease, and
/// object_store has no conditional delete. Once only (`lost` marks it given up).
fn release(remote: &Remote, holder: &str, token: &str, shared: &Shared) {
    *shared.expires_ms.lock().unwrap() = 0;
    let version = shared.version.lock().unwrap();
    if !shared.lost.swap(true, Ordering::SeqCst) {
        let _ = remote.swap(LEASE, body(holder, token, 0), version.clone());
    }
}
