//! Units and their parsers: durations (`60s`), sizes (`512KiB`), growth rates (`1MiB/min`),
//! overhead budgets (`1%`), file modes (`600`), and bytes for people (`1.5 KiB`). Every parser
//! gives a value or a one-line [`Error::Usage`]-style error naming the flag.
use std::time::Duration;

use crate::error::{Error, Result};

/// An optional duration flag: absent, or parsed as [`parse_duration`] parses it.
pub fn parse_optional_duration(
    flag: &'static str,
    value: Option<&str>,
) -> Result<Option<Duration>> {
    value.map(|v| parse_duration(flag, v)).transpose()
}

/// Parses a duration such as `60s`, `5m`, `1h30m`, `500ms`; a bare number is seconds.
pub fn parse_duration(flag: &'static str, value: &str) -> Result<Duration> {
    let trimmed = value.trim();
    let bad = |reason: String| Error::BadDuration {
        flag,
        value: value.to_string(),
        reason,
    };
    if trimmed.is_empty() {
        return Err(bad("empty".into()));
    }
    if let Ok(secs) = trimmed.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return Err(bad("must be a non-negative number of seconds".into()));
        }
        return Duration::try_from_secs_f64(secs).map_err(|e| bad(e.to_string()));
    }
    humantime::parse_duration(trimmed).map_err(|e| bad(e.to_string()))
}

/// A size such as `512KiB`, `4MB` or `100` (bytes), as a number of bytes.
fn size_bytes(size: &str) -> std::result::Result<f64, &'static str> {
    let size = size.trim();
    let split = size
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(size.len());
    let (number, unit) = size.split_at(split);
    let number: f64 = number.parse().map_err(|_| "no number")?;
    let unit = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" | "K" => 1024.0,
        "MiB" | "M" => 1024.0 * 1024.0,
        "GiB" | "G" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err("unknown unit"),
    };
    Ok(number * unit)
}

/// Parses a size such as `512KiB`, `64K`, `1MB` or `4096` into bytes.
pub fn parse_size(flag: &'static str, value: &str) -> Result<u64> {
    match size_bytes(value) {
        Ok(v) if (0.0..1.8e19).contains(&v) => Ok(v.round() as u64),
        Ok(_) => Err(Error::Usage(format!(
            "invalid size '{value}' for {flag}: too large"
        ))),
        Err(reason) => Err(Error::Usage(format!(
            "invalid size '{value}' for {flag}: {reason} (examples: 512KiB, 64K, 1MB)"
        ))),
    }
}

/// Parses `--max-overhead`: a percentage of one CPU (`1%`, `0.5%`), or `off`.
pub fn parse_budget(value: &str) -> Result<Option<f64>> {
    let v = value.trim();
    if v.eq_ignore_ascii_case("off") || v.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let bad = || {
        Error::Usage(format!(
            "invalid --max-overhead '{value}': give a percentage of one CPU such as 1% or \
             0.5%, or off"
        ))
    };
    let pct: f64 = v
        .strip_suffix('%')
        .ok_or_else(bad)?
        .trim()
        .parse()
        .map_err(|_| bad())?;
    if !(pct > 0.0 && pct <= 100.0) {
        return Err(bad());
    }
    Ok(Some(pct / 100.0))
}

/// Parses a growth rate such as `64KiB/s`, `10MB/min`, `1GiB/h` into bytes per second; a bare
/// size is per second.
pub fn parse_rate(flag: &'static str, value: &str) -> Result<f64> {
    let bad = |reason: &str| {
        Error::Usage(format!(
            "invalid rate '{value}' for {flag}: {reason} (examples: 64KiB/s, 10MB/min, 1GiB/h)"
        ))
    };
    let (size, per) = match value.trim().split_once('/') {
        Some((size, per)) => (size.trim(), per.trim()),
        None => (value.trim(), "s"),
    };
    let seconds = match per {
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" | "hour" => 3600.0,
        _ => return Err(bad("the period must be s, min or h")),
    };
    let rate = size_bytes(size).map_err(bad)? / seconds;
    if !(rate.is_finite() && rate > 0.0) {
        return Err(bad("must be more than 0"));
    }
    Ok(rate)
}

/// File permissions in octal (`600`, `0644`), nothing beyond rwx for user, group and others.
pub fn parse_mode(text: &str) -> Result<u32> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            Error::Usage(format!(
                "invalid --mode '{text}': permissions in octal, such as 600 or 644"
            ))
        })
}

/// Human-readable bytes: 1536 → "1.5 KiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("--r", "64KiB/s").unwrap(), 65536.0);
        assert_eq!(parse_rate("--r", "6MB/min").unwrap(), 100_000.0);
        assert_eq!(parse_rate("--r", "1000").unwrap(), 1000.0);
        for bad in ["", "KiB/s", "5XB/s", "5MB/day", "0/s", "-1/s"] {
            assert!(parse_rate("--r", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("d", "60s").unwrap(), Duration::from_secs(60));
        assert_eq!(
            parse_duration("d", "1.5").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("d", "5m").unwrap(), Duration::from_secs(300));
        assert_eq!(
            parse_duration("d", "250ms").unwrap(),
            Duration::from_millis(250)
        );
        for bad in ["", "abc", "-1", "10 parsecs", "1e400", "NaN"] {
            let e = parse_duration("--duration", bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid duration"), "{bad}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn modes_are_octal_permissions() {
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        for bad in ["", "8", "1777", "rw-", "-1"] {
            let e = parse_mode(bad).unwrap_err().to_string();
            assert!(e.contains("invalid --mode"), "{bad}: {e}");
        }
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }
}
