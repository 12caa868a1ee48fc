//! The clocks of events: the kernel stamps CLOCK_MONOTONIC, people read UTC.

use std::time::SystemTime;

/// Turns CLOCK_MONOTONIC stamps into wall-clock time.
pub struct Clock {
    wall_at_start: SystemTime,
    mono_at_start_ns: u64,
}

impl Clock {
    pub fn new() -> Self {
        Clock { wall_at_start: SystemTime::now(), mono_at_start_ns: monotonic_ns() }
    }

    pub(crate) fn wall_seconds(&self, mono_ns: u64) -> f64 {
        let offset = i128::from(mono_ns) - i128::from(self.mono_at_start_ns);
        let start = self.wall_at_start.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        start.as_secs_f64() + offset as f64 / 1e9
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    use nix::sys::time::TimeValLike as _;
    // It cannot fail (a valid clock, a valid pointer); 0 if it ever did, as before.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |now| u64::try_from(now.num_nanoseconds()).unwrap_or(0))
}

/// Now, in seconds since the Unix epoch.
pub(crate) fn wall_seconds_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Seconds since the epoch as UTC, ISO 8601 to the millisecond (`2026-12-07T02:41:09.123Z`).
pub fn utc(seconds: f64) -> String {
    let millis = (seconds * 1000.0).round() as i64;
    let (days, ms_of_day) = (millis.div_euclid(86_400_000), millis.rem_euclid(86_400_000));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, ms) =
        (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps_are_iso_8601() {
        assert_eq!(utc(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400.5), "2000-02-29T00:00:00.500Z");
        assert_eq!(utc(1_796_611_269.123), "2026-12-07T02:41:09.123Z");
    }

    #[test]
    fn monotonic_stamps_become_wall_clock_time() {
        let clock = Clock::new();
        assert!((clock.wall_seconds(monotonic_ns()) - wall_seconds_now()).abs() < 5.0);
    }
}
