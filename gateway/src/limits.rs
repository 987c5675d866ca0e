//! Per-user abuse limits, exact across gateways ([`shared::quota`]): creates and actions per
//! minute (token buckets), stored conversations and open sockets per user (capped sets).
//!
//! Defaults apply in multi-user mode (`OH_AUTH_TOKENS` set); single-user mode has one
//! trusted local user, so nothing is limited unless a setting says so. A limit whose Redis
//! check fails lets the request through (logged): Redis is rebuildable state and must not
//! take the service down with it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use shared::id::UserId;
use shared::quota::{self, Capped, Rate, Verdict};
use tracing::warn;

use crate::app::AppState;

/// Default rates and caps of multi-user mode.
pub(crate) const DEFAULT_CREATE: Rate = Rate {
    per_minute: 60,
    burst: 20,
};
pub(crate) const DEFAULT_MESSAGE: Rate = Rate {
    per_minute: 600,
    burst: 60,
};
pub(crate) const DEFAULT_MAX_STORED: u32 = 1_000;
pub(crate) const DEFAULT_MAX_SOCKETS: u32 = 100;

/// The limits in force (see `Args::limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) create: Rate,
    pub(crate) message: Rate,
    /// Stored conversations per user (`None`: no cap).
    pub(crate) max_stored: Option<u32>,
    /// Open sockets per user, over all gateways (`None`: no cap).
    pub(crate) max_sockets: Option<u32>,
}

/// How often this gateway refreshes the expiry of the sockets it holds.
pub(crate) const SOCKET_REFRESH: Duration = Duration::from_secs(20);

/// Parses a rate: `off`, `N/min` or `N/s`, optionally `,BURST` (default: a third of a minute's
/// worth, at least 1).
pub(crate) fn parse_rate(s: &str) -> Result<Rate, String> {
    let s = s.trim();
    if s == "off" || s == "0" {
        return Ok(Rate::OFF);
    }
    let (rate, burst) = match s.split_once(',') {
        Some((r, b)) => (r, Some(b)),
        None => (s, None),
    };
    let bad = || format!("{s:?}: expected off, N/min or N/s, optionally followed by ,BURST");
    let (n, unit) = rate.split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    let per_minute = match unit.trim() {
        "min" | "m" => n,
        "s" | "sec" => n.checked_mul(60).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if per_minute == 0 {
        return Ok(Rate::OFF);
    }
    let burst = match burst {
        Some(b) => b.trim().parse::<u32>().map_err(|_| bad())?.max(1),
        None => (per_minute / 3).max(1),
    };
    Ok(Rate { per_minute, burst })
}

/// Takes a token of `kind` (`create`, `message`) for `uid`.
pub(crate) async fn take(
    state: &AppState,
    kind: &'static str,
    uid: &UserId,
    rate: Rate,
) -> Verdict {
    let mut redis = state.redis.clone();
    match quota::take(&mut redis, state.store.names(), kind, uid, rate).await {
        Ok(v) => {
            if let Verdict::Limited(_) = v {
                metrics::counter!("oh_gateway_rate_limited_total", "kind" => kind).increment(1);
            }
            v
        }
        Err(e) => {
            warn!(kind, error = %e, "rate check skipped (Redis)");
            Verdict::Allowed
        }
    }
}

/// Admits `member` into the user's capped `set`; `false` if the user is at `cap`.
pub(crate) async fn admit(
    state: &AppState,
    set: Capped,
    uid: &UserId,
    member: &str,
    cap: u32,
) -> bool {
    let mut redis = state.redis.clone();
    match quota::admit(&mut redis, state.store.names(), set, uid, member, cap).await {
        Ok(true) => true,
        Ok(false) => {
            let which = match set {
                Capped::Conversations => "conversations",
                Capped::Sockets => "sockets",
            };
            metrics::counter!("oh_gateway_user_cap_refusals_total", "cap" => which).increment(1);
            false
        }
        Err(e) => {
            warn!(error = %e, "per-user cap check skipped (Redis)");
            true
        }
    }
}

/// Removes `member` from the user's capped `set` (best effort: a socket entry expires).
pub(crate) async fn release(state: &AppState, set: Capped, uid: &UserId, member: &str) {
    let mut redis = state.redis.clone();
    if let Err(e) = quota::release(&mut redis, state.store.names(), set, uid, member).await {
        warn!(error = %e, "per-user cap release failed");
    }
}

/// The sockets this gateway holds in the per-user socket sets (member → user), refreshed
/// every [`SOCKET_REFRESH`] so that a dead gateway's entries expire.
#[derive(Debug, Default)]
pub(crate) struct HeldSockets(Mutex<HashMap<String, UserId>>);

impl HeldSockets {
    pub(crate) fn insert(&self, member: String, uid: UserId) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(member, uid);
        }
    }

    pub(crate) fn remove(&self, member: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(member);
        }
    }

    fn snapshot(&self) -> Vec<(UserId, String)> {
        self.0
            .lock()
            .map(|m| m.iter().map(|(k, v)| (v.clone(), k.clone())).collect())
            .unwrap_or_default()
    }
}

/// Refreshes this gateway's socket entries until `cancel` fires.
pub(crate) async fn refresh_loop(state: AppState, cancel: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(SOCKET_REFRESH) => {}
        }
        let held = state.held_sockets.snapshot();
        let mut redis = state.redis.clone();
        if let Err(e) = quota::refresh_sockets(&mut redis, state.store.names(), &held).await {
            warn!(error = %e, "socket entries not refreshed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_parsed() {
        assert_eq!(parse_rate("off"), Ok(Rate::OFF));
        assert_eq!(parse_rate("0/min"), Ok(Rate::OFF));
        assert_eq!(
            parse_rate("60/min"),
            Ok(Rate {
                per_minute: 60,
                burst: 20
            })
        );
        assert_eq!(
            parse_rate("2/s,5"),
            Ok(Rate {
                per_minute: 120,
                burst: 5
            })
        );
        assert_eq!(
            parse_rate("1/min"),
            Ok(Rate {
                per_minute: 1,
                burst: 1
            })
        );
        for bad in ["", "10", "10/h", "x/min", "10/min,x", "4294967295/s"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
    }
}
