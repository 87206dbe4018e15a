//! What bridge-trace asks of the operating system on every path: clocks, process descriptors,
//! the stop signals, and who invoked it through sudo.
use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    time::SystemTime,
};

use tokio::signal::unix::{Signal, SignalKind};

use crate::error::{Error, Result};

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall with a valid out-struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Now, as [`utc_stamp`] writes it.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_stamp(secs)
}

/// `YYYYmmdd-HHMMSS` in UTC.
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// SIGINT and SIGTERM as streams: both stop a recording (or a watch) cleanly.
pub fn stop_signals() -> Result<(Signal, Signal)> {
    let install = |kind: SignalKind, name: &str| {
        tokio::signal::unix::signal(kind)
            .map_err(|e| Error::io(format!("installing the {name} handler"), e))
    };
    Ok((
        install(SignalKind::interrupt(), "SIGINT")?,
        install(SignalKind::terminate(), "SIGTERM")?,
    ))
}

pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new descriptor owned here.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The invoking user's ids when bridge-trace runs as root through sudo.
pub fn sudo_ids() -> Option<(libc::uid_t, libc::gid_t)> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let uid = std::env::var("SUDO_UID").ok()?.parse().ok()?;
    let gid = std::env::var("SUDO_GID").ok()?.parse().ok()?;
    if uid == 0 {
        return None;
    }
    Some((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(1_779_753_600 + 3_661), "20260526-010101");
    }
}
