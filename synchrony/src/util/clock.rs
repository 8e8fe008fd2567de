//! The engine's one wall clock, in the two units it stores, signs and compares: Unix
//! milliseconds (log rows, heartbeats, locks, registry entries, announcements, the supervisor's
//! status) and Unix seconds (token claims). A clock before 1970 reads as 0.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (never negative: `unsigned_abs` gives it as a `u64`).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_units_read_the_same_clock() {
        let (ms, secs) = (unix_ms(), unix_secs());
        assert!(ms > 1_600_000_000_000, "{ms}");
        assert!((ms / 1000).abs_diff(secs as i64) <= 1, "{ms} {secs}");
    }
}
